// The configuration list shared by the test suites and the benchmarks: one line per const
// configuration, so that what is tested is what is measured. `$m!(name, HQ, HKV, D)` is called
// for each; `name` becomes part of test and benchmark names through `paste`.
//
// It covers MHA, GQA with groups of 2, 3, 4, 5 and 8, and MQA; the head dims of real models
// (64, 80, 96, 128, 256) and head dims that are not multiples of 16, where SIMD loops have
// tails and packed cache rows end in a partial word (1, 3, 17, 72, 200: an f16 pair, an int8
// quad or an int4 octet cut short).
#[allow(unused_macros)]
macro_rules! for_each_config {
    ($m:ident) => {
        $m!(mha_4_4_d32, 4, 4, 32);
        $m!(gqa_8_2_d64, 8, 2, 64);
        $m!(gqa_32_8_d128, 32, 8, 128);
        $m!(gqa_12_4_d80, 12, 4, 80);
        $m!(gqa_6_2_d96, 6, 2, 96);
        $m!(gqa_10_5_d72, 10, 5, 72);
        $m!(gqa_20_4_d256, 20, 4, 256);
        $m!(mqa_8_1_d128, 8, 1, 128);
        $m!(mqa_16_1_d17, 16, 1, 17);
        $m!(gqa_4_2_d1, 4, 2, 1);
        $m!(gqa_9_3_d3, 9, 3, 3);
        $m!(gqa_16_2_d200, 16, 2, 200);
    };
}
