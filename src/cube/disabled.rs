//! Stand-ins for the cubecl side when no cubecl runtime feature is on: the API exists and says
//! so through [`Error::NotCompiledWith`]; no device, and so nothing else, can be reached.

use super::DecodeInputs;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::spec::{AttentionSpec, ProblemShape};

pub trait KernelElement {}
impl KernelElement for f32 {}
impl KernelElement for half::f16 {}
impl KernelElement for half::bf16 {}

/// Uninhabited: without a runtime there is no device.
pub enum Device {}

#[derive(Clone)]
pub struct Buffer;

impl Device {
    pub fn open_default() -> Result<Device> {
        Err(Error::NotCompiledWith {
            backend: "cubecl GPU",
            feature: "wgpu",
        })
    }
}

#[allow(clippy::unused_self, clippy::extra_unused_type_parameters)]
impl Device {
    pub fn name(&self) -> &str {
        match *self {}
    }
    pub fn key(&self) -> &std::sync::Arc<()> {
        match *self {}
    }
    pub fn supports(&self, _: DType) -> bool {
        match *self {}
    }
    pub fn pinned_forward_tile(&self) -> Option<super::ForwardTile> {
        match *self {}
    }
    pub fn set_forward_tile(&mut self, _: super::ForwardTile) {
        match *self {}
    }
    pub fn set_untuned(&mut self) {
        match *self {}
    }
    pub fn plane_loads(&self) -> bool {
        match *self {}
    }
    pub fn forward_key_splits(
        &self,
        _: &AttentionSpec,
        _: super::ForwardTile,
        _: usize,
    ) -> Result<usize> {
        match *self {}
    }
    pub fn plane_decode_lanes(&self) -> Option<usize> {
        match *self {}
    }
    pub fn set_backward_stage_bytes(&mut self, _: usize) {
        match *self {}
    }
    pub fn backward_stage_bytes(&self) -> usize {
        match *self {}
    }
    pub fn set_unit_decode(&mut self) {
        match *self {}
    }
    pub fn untuned_forward_tile(&self, _: usize) -> super::ForwardTile {
        match *self {}
    }
    pub fn tuned_forward_tile<T>(
        &self,
        _: &AttentionSpec,
        _: ProblemShape,
    ) -> Option<super::ForwardTile> {
        match *self {}
    }
    pub fn matrix_core_shapes(&self, _: DType) -> Vec<(u32, u32, u32)> {
        match *self {}
    }
    pub fn sync(&self, _: &'static str) -> Result<()> {
        match *self {}
    }
    pub fn upload<T>(&self, _: &'static str, _: &[T]) -> Result<Buffer> {
        match *self {}
    }
    pub fn download<T>(&self, _: &'static str, _: &Buffer) -> Result<Vec<T>> {
        match *self {}
    }
    pub fn scatter_rows(
        &self,
        _: &'static str,
        _: &Buffer,
        _: &[u32],
        _: &[u32],
        _: usize,
    ) -> Result<()> {
        match *self {}
    }
    pub fn decode<T, M, S>(
        &self,
        _: &'static str,
        _: &AttentionSpec,
        _: DecodeInputs<'_>,
        _: (&Buffer, &Buffer),
    ) -> Result<()> {
        match *self {}
    }
    pub fn stream(&self, _: &'static str, _: usize, _: DecodeInputs<'_>) -> Result<()> {
        match *self {}
    }
    pub fn forward<T, M, S>(&self, _: super::ForwardCall<'_>) -> Result<()> {
        match *self {}
    }
    pub fn backward<T, M, S>(&self, _: super::BackwardCall<'_>) -> Result<()> {
        match *self {}
    }
    pub fn backward_block_mask_tiles(&self, _: &AttentionSpec) -> Result<(usize, usize)> {
        match *self {}
    }
    pub fn fill_zeros<T>(&self, _: &'static str, _: &Buffer) -> Result<()> {
        match *self {}
    }
    pub fn block_mask_tiles(
        &self,
        _: &AttentionSpec,
        _: super::ForwardTile,
    ) -> Result<(usize, usize)> {
        match *self {}
    }
    pub fn constant(&self, _: &'static str, _: &[u32]) -> Result<Buffer> {
        match *self {}
    }
    pub fn empty(&self, _: &'static str, _: usize, _: usize) -> Result<Buffer> {
        match *self {}
    }
}
