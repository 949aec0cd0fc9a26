//! The KV cache: its exact size ([`KvCacheFootprint`]) and the cache itself ([`KvCache`]).
//!
//! During generation every layer keeps a key and a value vector per KV head per token, so the
//! cache is `2 · layers · kv_heads · head_dim · bytes` per token — and sharing each KV head
//! among `q_heads / kv_heads` query heads shrinks it by exactly that factor. 8- and 4-bit
//! storage ([`Int8`], [`Int4`]) shrink it again, plus one scale per row ([`storage`]).

mod footprint;
mod kv;
mod pages;
pub mod storage;

pub use footprint::KvCacheFootprint;
pub use kv::KvCache;
pub use pages::{Layout, SeqId};
pub use storage::{BFloat16, Float16, Float32, Int4, Int8, KvStorage, StorageKind};
