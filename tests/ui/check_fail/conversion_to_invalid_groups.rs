// Converting 32 MHA heads into 6 KV heads: 32 query heads cannot be shared by 6.
fn main() {
    let mha = gqa::layer::MhaLayer::<32, 8>::random(64, 0);
    let _gqa = mha.to_gqa::<6>(gqa::layer::KvInit::MeanPool);
}
