// The configuration list shared by the test suites and the benchmarks: one line per const
// configuration, so that what is tested is what is measured. `$m!(name, HQ, HKV, D)` is called
// for each; `name` becomes part of test and benchmark names through `paste`.
//
// It covers MHA, GQA with groups of 2, 3, 4 and 5, and MQA, and every head dim the kernel suites
// are asked to cover (32, 64, 80, 96, 128, 256) at least once.
#[allow(unused_macros)]
macro_rules! for_each_config {
    ($m:ident) => {
        $m!(mha_4_4_d32, 4, 4, 32);
        $m!(gqa_8_2_d64, 8, 2, 64);
        $m!(gqa_32_8_d128, 32, 8, 128);
        $m!(gqa_12_4_d80, 12, 4, 80);
        $m!(gqa_6_2_d96, 6, 2, 96);
        $m!(gqa_10_5_d64, 10, 5, 64);
        $m!(gqa_20_4_d256, 20, 4, 256);
        $m!(mqa_8_1_d128, 8, 1, 128);
        $m!(mqa_16_1_d32, 16, 1, 32);
    };
}
