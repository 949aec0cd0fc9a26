//! What must not compile, proven with trybuild (programs and expected errors beside this file).
//!
//! trybuild runs `cargo check` when a `TestCases` holds only compile-fail programs and `cargo
//! build` when it also holds a passing one. So the compile-fail programs run twice: alone
//! (proving `cargo check` rejects them, with the numbers in the message) and beside the passing
//! programs (proving `cargo build` does too, and that the valid configurations build and run).

#[test]
fn invalid_configurations_do_not_compile() {
    {
        let check_only = trybuild::TestCases::new();
        check_only.compile_fail("check_fail/*.rs");
    } // a TestCases runs when dropped

    let build = trybuild::TestCases::new();
    build.pass("pass/*.rs");
    build.compile_fail("check_fail/*.rs");
}

/// DSL mods outside the language are compile errors at the user's tokens: the macro's own
/// errors, raised at expansion, so the same under `cargo check` and `cargo build`.
#[test]
fn mods_outside_the_language_do_not_compile() {
    trybuild::TestCases::new().compile_fail("dsl_fail/*.rs");
}
