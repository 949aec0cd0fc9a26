//! The device and the test runner of the kernel suites (`cube_forward.rs`, `cube_decode.rs`).

use std::sync::OnceLock;

use gqa::cube::CubeDevice;

/// The device, opened once per test binary (`None`: no device outside CI). Its forward tile is
/// the untuned rule's (`CubeDevice::untuned`): autotune would compile and time every candidate
/// tile of every specialisation the suites draw; `cube_forward.rs` proves the other candidates
/// and autotune itself on a few.
pub fn device() -> Option<&'static CubeDevice> {
    static DEVICE: OnceLock<Option<CubeDevice>> = OnceLock::new();
    DEVICE
        .get_or_init(|| match CubeDevice::try_default() {
            Ok(device) => {
                eprintln!("cube tests run on {}", device.name());
                Some(device.untuned())
            }
            Err(error) if std::env::var_os("CI").is_some() => {
                panic!("CI needs a GPU device for the kernel tests: {error}")
            }
            Err(error) => {
                eprintln!(
                    "\n*** SKIPPED: no device for the cubecl kernel tests ({error}).\n\
                     *** For a software Vulkan device: apt-get install mesa-vulkan-drivers libvulkan1\n"
                );
                None
            }
        })
        .as_ref()
}

/// Cases per configuration and specialisation: `GQA_CUBE_CASES`, default 3 (each distinct
/// kernel costs a compile; the cases vary runtime values only).
pub fn cases() -> u32 {
    super::runner::env_count("GQA_CUBE_CASES", 3)
}
