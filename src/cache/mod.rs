//! The KV cache. For now its exact size ([`KvCacheFootprint`]): the number that makes GQA worth
//! having. During generation every layer keeps a key and a value vector per KV head per token, so
//! the cache is `2 · layers · kv_heads · head_dim · bytes` per token — and sharing each KV head
//! among `q_heads / kv_heads` query heads shrinks it by exactly that factor.

mod footprint;

pub use footprint::KvCacheFootprint;
