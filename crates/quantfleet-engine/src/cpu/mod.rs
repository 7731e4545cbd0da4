//! The CPU backend: weights stay in the GGUF memory map in their block format, activations and the KV cache
//! are host f32 buffers, kernels are chosen at construction for the CPU's instruction set.

mod attention;
pub mod dot;
mod gemm;
mod kivi;
mod matmul;
mod packed_kernels;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_bf16;

/// Whether this CPU has the AVX-512 BF16 dot product the BF16/INT4 kernels of bf16-activation tiers use.
fn bf16_dot_products() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86_bf16::has_avx512bf16();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests;

use std::sync::Arc;

use rayon::prelude::*;

pub use matmul::{ISA_ENV, SimdLevel, isa_cap};

use crate::backend::{Backend, KvLayout, RopeTable, SeqSpan};
use crate::dtype::dequantize_row_reference;
use crate::error::{EngineError, Result};
use crate::kv_cache::{self, KvDtype};
use crate::packed::{ActivationQuant, PackedFormat, PackedMatrix};
use crate::weights::{WeightBytes, WeightTensor};
use matmul::BlockMatrix;

#[derive(Debug, Clone)]
pub struct CpuBackend {
    level: SimdLevel,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// The best kernels for this CPU.
    pub fn new() -> Self {
        Self { level: SimdLevel::detect() }
    }

    /// Kernels for a given instruction set (tests compare levels); an unsupported level is an error.
    pub fn with_level(level: SimdLevel) -> Result<Self> {
        if !level.is_supported() {
            return Err(EngineError::InvalidRequest(format!("this CPU does not support {level:?}")));
        }
        Ok(Self { level })
    }

    pub fn level(&self) -> SimdLevel {
        self.level
    }
}

/// Most matrices `matmul_many` runs in one parallel region (Q, K, V).
const MAX_FUSED: usize = 4;

impl AsMut<[f32]> for CpuTensor {
    fn as_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// A weight matrix: either in a GGUF block format (f32/f16/bf16 included) where the model's bytes are (the
/// model file's memory map, GGUF or safetensors, or a buffer rearranged at load), or quantized at load for a
/// precision tier and owned in memory.
pub enum CpuMatrix {
    Gguf { view: MatrixRef, file: Arc<dyn WeightBytes> },
    Packed(PackedMatrix),
}

#[derive(Clone, Copy)]
pub struct MatrixRef {
    ty: crate::dtype::GgmlType,
    rows: usize,
    cols: usize,
    start: usize,
    len: usize,
}

impl CpuMatrix {
    fn block(&self) -> Option<BlockMatrix<'_>> {
        match self {
            CpuMatrix::Gguf { view: v, file } => Some(BlockMatrix {
                ty: v.ty,
                rows: v.rows,
                cols: v.cols,
                data: &file.bytes()[v.start..v.start + v.len],
            }),
            CpuMatrix::Packed(_) => None,
        }
    }

    /// The packed matrix (None for a GGUF one).
    fn packed(&self) -> Option<&PackedMatrix> {
        match self {
            CpuMatrix::Packed(p) => Some(p),
            CpuMatrix::Gguf { .. } => None,
        }
    }

    /// The element type and bytes of a GGUF matrix (None for a packed one).
    pub fn gguf_data(&self) -> Option<(crate::dtype::GgmlType, &[u8])> {
        self.block().map(|b| (b.ty, b.data))
    }

    pub fn shape(&self) -> (usize, usize) {
        match self {
            CpuMatrix::Gguf { view, .. } => (view.rows, view.cols),
            CpuMatrix::Packed(p) => (p.rows, p.cols),
        }
    }

    /// Bytes of weight data this matrix reads (in the file map or owned).
    pub fn storage_bytes(&self) -> usize {
        match self {
            CpuMatrix::Gguf { view, .. } => view.len,
            CpuMatrix::Packed(p) => p.storage_bytes(),
        }
    }

    /// A short name of the storage format (`Q4_1`, `fp8-e4m3`, `int4-g128-asym`, ...).
    pub fn format_name(&self) -> String {
        match self {
            CpuMatrix::Gguf { view, .. } => view.ty.name().to_owned(),
            CpuMatrix::Packed(p) => p.format_name(),
        }
    }
}

/// Row-major `[rows, cols]` f32 activations.
#[derive(Debug, Clone, Default)]
pub struct CpuTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

fn shape_err(op: &str, detail: String) -> EngineError {
    EngineError::InvalidRequest(format!("{op}: {detail}"))
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Activations = CpuTensor;
    type KvStorage = CpuKvStorage;

    fn name(&self) -> String {
        format!("cpu-{:?}", self.level).to_lowercase()
    }

    /// The pass runs on a rayon worker (`scope` from outside the pool moves it there; inside, it runs in place).
    fn run_pass<R: Send>(&self, pass: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| pass())
    }

    fn upload_weight(&self, w: &WeightTensor) -> Result<CpuMatrix> {
        if w.dims.len() != 2 || !w.ggml_type.is_computable() {
            return Err(EngineError::UnsupportedModel(format!(
                "tensor {} ({} {:?}) is not a 2-D matrix of a supported type",
                w.name,
                w.ggml_type.name(),
                w.dims
            )));
        }
        let (store, start, len) = w.store();
        let view = MatrixRef { ty: w.ggml_type, cols: w.dims[0] as usize, rows: w.dims[1] as usize, start, len };
        Ok(CpuMatrix::Gguf { view, file: Arc::clone(store) })
    }

    /// Matrices are re-ordered into interleaved rows where a kernel reads them so: INT4 with INT8 activations
    /// in groups of eight rows for the x86 integer kernels (`PackedLayout::Int4Rows8`, rows a multiple of 8),
    /// and at the AVX2 level INT4 with bf16 activations too (its inputs then taken as 16-bit fixed point by the
    /// same kernels, columns a multiple of 32); every format with bf16 activations, on a CPU with AVX-512
    /// BF16, in groups of sixteen for its bf16 dot products (`PackedLayout::Int4Rows16` / `Bf16Rows16` /
    /// `Byte8Rows16`, rows a multiple of 16, columns of 32).
    fn upload_packed(&self, m: PackedMatrix) -> Result<CpuMatrix> {
        m.validate()?;
        let x86 = matches!(self.level, SimdLevel::Avx2Fma | SimdLevel::Avx512);
        let int4 = matches!(m.format, PackedFormat::Int4 { .. });
        let m = match m.activations {
            ActivationQuant::Int8 if int4 && x86 && m.rows.is_multiple_of(8) => m.interleave_rows8()?,
            // Without bf16 dot products, AVX2's f32 INT4 kernel widens and converts every nibble; the integer
            // kernels on fixed-point inputs run the products 1.7-2.9x faster. (AVX-512 without BF16 keeps its
            // f32 kernel, which dequantizes through a 16-entry permute at no such cost.)
            ActivationQuant::Bf16
                if int4
                    && self.level == SimdLevel::Avx2Fma
                    && m.rows.is_multiple_of(8)
                    && m.cols.is_multiple_of(32) =>
            {
                m.interleave_rows8()?
            }
            ActivationQuant::Bf16
                if self.level == SimdLevel::Avx512
                    && bf16_dot_products()
                    && m.rows.is_multiple_of(16)
                    && m.cols.is_multiple_of(32) =>
            {
                m.interleave_rows16()?
            }
            _ => m,
        };
        Ok(CpuMatrix::Packed(m))
    }

    fn matrix_storage_bytes(&self, m: &CpuMatrix) -> usize {
        m.storage_bytes()
    }

    fn upload_vector(&self, values: &[f32]) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn matrix_shape(&self, m: &CpuMatrix) -> (usize, usize) {
        m.shape()
    }

    fn new_activations(&self) -> CpuTensor {
        CpuTensor::default()
    }

    fn resize(&self, a: &mut CpuTensor, rows: usize, cols: usize) -> Result<()> {
        let n = rows.checked_mul(cols).ok_or_else(|| shape_err("resize", format!("{rows} x {cols} overflows")))?;
        a.data.resize(n, 0.0);
        (a.rows, a.cols) = (rows, cols);
        Ok(())
    }

    fn shape(&self, a: &CpuTensor) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn to_host(&self, a: &CpuTensor, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        out.extend_from_slice(&a.data);
        Ok(())
    }

    fn gather_rows(&self, src: &CpuTensor, rows: &[usize], dst: &mut CpuTensor) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| r >= src.rows) {
            return Err(shape_err("gather_rows", format!("row {r} of {}", src.rows)));
        }
        self.resize(dst, rows.len(), src.cols)?;
        for (d, &r) in dst.data.chunks_exact_mut(src.cols).zip(rows) {
            d.copy_from_slice(&src.data[r * src.cols..(r + 1) * src.cols]);
        }
        Ok(())
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32], out: &mut CpuTensor) -> Result<()> {
        let (rows, cols) = table.shape();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
            return Err(EngineError::TokenOutOfRange { id, vocab: rows });
        }
        self.resize(out, ids.len(), cols)?;
        for (o, &id) in out.data.chunks_exact_mut(cols).zip(ids) {
            let id = id as usize;
            match (table, table.block()) {
                (_, Some(m)) => {
                    let rb = m.data.len() / m.rows;
                    dequantize_row_reference(m.ty, &m.data[id * rb..(id + 1) * rb], o)?;
                }
                (CpuMatrix::Packed(p), None) => {
                    // AWQ input scales apply to the matrix's use as lm_head, not to the embedding rows.
                    p.dequantize_row_reference(id, o)?;
                }
                (CpuMatrix::Gguf { .. }, None) => unreachable!("GGUF matrices always have a block view"),
            }
        }
        Ok(())
    }

    fn matmul(&self, w: &CpuMatrix, x: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        let (rows, cols) = w.shape();
        if x.cols != cols {
            return Err(shape_err("matmul", format!("x has {} columns, W has {}", x.cols, cols)));
        }
        self.resize(out, x.rows, rows)?;
        match w {
            CpuMatrix::Packed(p) => packed_kernels::matmul(self.level, p, &x.data, x.rows, &mut out.data),
            CpuMatrix::Gguf { .. } => {
                let m = w.block().expect("GGUF matrices have a block view");
                matmul::matmul(self.level, m, &x.data, x.rows, &mut out.data)
            }
        }
        Ok(())
    }

    fn matmul_many(&self, ws: &[&CpuMatrix], x: &CpuTensor, outs: &mut [&mut CpuTensor]) -> Result<()> {
        if ws.len() != outs.len() {
            return Err(shape_err("matmul_many", "one output per matrix".into()));
        }
        if x.rows != 1 || ws.is_empty() || ws.len() > MAX_FUSED {
            // Several tokens: each product is large enough to fill the pool on its own. Packed matrices go
            // together, so that the tokens' INT8 activations are quantized once for all of them.
            if let Some(packed) = ws.iter().map(|w| w.packed()).collect::<Option<Vec<&PackedMatrix>>>() {
                for (w, out) in ws.iter().zip(outs.iter_mut()) {
                    let (rows, cols) = w.shape();
                    if cols != x.cols {
                        return Err(shape_err("matmul_many", format!("x has {} columns, W has {}", x.cols, cols)));
                    }
                    self.resize(out, x.rows, rows)?;
                }
                let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o.data[..]).collect();
                packed_kernels::matmul_many(self.level, &packed, &x.data, x.rows, &mut slices);
                return Ok(());
            }
            for (w, out) in ws.iter().zip(outs.iter_mut()) {
                self.matmul(w, x, out)?;
            }
            return Ok(());
        }
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            let (rows, cols) = w.shape();
            if cols != x.cols {
                return Err(shape_err("matmul_many", format!("x has {} columns, W has {}", x.cols, cols)));
            }
            self.resize(out, 1, rows)?;
        }
        if ws.iter().all(|w| matches!(w, CpuMatrix::Packed(_))) {
            let mut packed: [Option<&PackedMatrix>; MAX_FUSED] = [None; MAX_FUSED];
            for (slot, w) in packed.iter_mut().zip(ws) {
                if let CpuMatrix::Packed(p) = w {
                    *slot = Some(p);
                }
            }
            let packed: Vec<&PackedMatrix> = packed.iter().flatten().copied().collect();
            packed_kernels::matvec_many(self.level, &packed, &x.data, outs);
            return Ok(());
        }
        if let Some(first) = ws[0].block()
            && ws.iter().all(|w| w.block().is_some())
        {
            // A stack array, not a Vec: this runs several times per layer per decoded token.
            let mut blocks = [first; MAX_FUSED];
            for (slot, w) in blocks.iter_mut().zip(ws) {
                *slot = w.block().expect("checked above");
            }
            matmul::matvec_many(self.level, &blocks[..ws.len()], &x.data, outs);
            return Ok(());
        }
        // Mixed storage (a layer override between them): one product at a time.
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.matmul(w, x, out)?;
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CpuTensor, w: &Vec<f32>, eps: f32, out: &mut CpuTensor) -> Result<()> {
        if w.len() != x.cols {
            return Err(shape_err("rms_norm", format!("weight {} for {} columns", w.len(), x.cols)));
        }
        self.resize(out, x.rows, x.cols)?;
        for (o, xr) in out.data.chunks_exact_mut(x.cols).zip(x.data.chunks_exact(x.cols)) {
            let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / x.cols as f32;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for ((o, &v), &g) in o.iter_mut().zip(xr).zip(w) {
                *o = v * inv * g;
            }
        }
        Ok(())
    }

    fn rope(&self, x: &mut CpuTensor, head_dim: usize, table: &RopeTable) -> Result<()> {
        let half = head_dim / 2;
        if table.half != half || table.cos.len() != x.rows * half || !x.cols.is_multiple_of(head_dim) {
            return Err(shape_err("rope", format!("table for {} rows x {} pairs", table.cos.len(), table.half)));
        }
        let cols = x.cols;
        for (r, row) in x.data.chunks_exact_mut(cols).enumerate() {
            let (cos, sin) = (&table.cos[r * half..(r + 1) * half], &table.sin[r * half..(r + 1) * half]);
            for head in row.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * cos[i] - b * sin[i];
                    head[2 * i + 1] = a * sin[i] + b * cos[i];
                }
            }
        }
        Ok(())
    }

    fn swiglu(&self, gate: &CpuTensor, up: &CpuTensor, out: &mut CpuTensor) -> Result<()> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) {
            return Err(shape_err("swiglu", "gate and up shapes differ".into()));
        }
        self.resize(out, gate.rows, gate.cols)?;
        out.data.par_chunks_mut(4096).zip(gate.data.par_chunks(4096)).zip(up.data.par_chunks(4096)).for_each(
            |((o, g), u)| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            },
        );
        Ok(())
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(shape_err("add_assign", "shapes differ".into()));
        }
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn new_kv_storage(&self, layout: KvLayout, dtype: KvDtype, n_blocks: usize) -> Result<CpuKvStorage> {
        let words = match dtype {
            KvDtype::Int4Kivi { .. } => kv_cache::KiviGeometry::block_words(&layout),
            _ => layout.block_elems(),
        };
        words.checked_mul(n_blocks).ok_or_else(|| shape_err("kv storage", format!("{n_blocks} blocks overflow")))?;
        // Zeroed allocation: the OS commits pages only when blocks are first written.
        Ok(CpuKvStorage { layout, n_blocks, store: attention::KvStore::new(dtype, &layout, n_blocks)? })
    }

    fn kv_write(
        &self,
        kv: &mut CpuKvStorage,
        layer: usize,
        k: &CpuTensor,
        v: &CpuTensor,
        spans: &[SeqSpan<'_>],
    ) -> Result<()> {
        let width = kv.layout.n_kv_heads * kv.layout.head_dim;
        if (k.cols, v.cols) != (width, width) || k.rows != v.rows {
            return Err(shape_err("kv_write", format!("k/v widths {}/{} for {:?}", k.cols, v.cols, kv.layout)));
        }
        kv.check(layer, k.rows, spans)?;
        attention::kv_write(&mut kv.store, &kv.layout, layer, &k.data, &v.data, spans);
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        kv: &CpuKvStorage,
        layer: usize,
        spans: &[SeqSpan<'_>],
        out: &mut CpuTensor,
    ) -> Result<()> {
        let l = kv.layout;
        let n_heads = q.cols / l.head_dim;
        if !q.cols.is_multiple_of(l.head_dim) || !n_heads.is_multiple_of(l.n_kv_heads) {
            return Err(shape_err("attention", format!("q width {} for {l:?}", q.cols)));
        }
        kv.check(layer, q.rows, spans)?;
        self.resize(out, q.rows, q.cols)?;
        attention::attention(self.level, &kv.store, &l, layer, &q.data, n_heads, spans, &mut out.data);
        Ok(())
    }
}

/// KV blocks in host memory, `layout.block_elems()` elements of the cache's dtype per block (plus scales).
pub struct CpuKvStorage {
    layout: KvLayout,
    n_blocks: usize,
    store: attention::KvStore,
}

impl CpuKvStorage {
    /// Bytes allocated for elements and scales.
    pub fn allocated_bytes(&self) -> usize {
        let elem = match self.store.data {
            attention::KvData::F32(_) => 4,
            attention::KvData::F16(_) | attention::KvData::Bf16(_) => 2,
            attention::KvData::Fp8(_) | attention::KvData::Int8(_) => 1,
            attention::KvData::Int4 { ref params, .. } => return self.store.len() + 4 * params.len(),
            attention::KvData::Kivi(_) => 2,
        };
        elem * self.store.len() + 4 * self.store.scales.len()
    }
}

impl CpuKvStorage {
    /// Spans must tile the batch rows exactly and their block tables must cover their positions with valid
    /// block ids: the kernels index without further checks.
    fn check(&self, layer: usize, rows: usize, spans: &[SeqSpan]) -> Result<()> {
        let l = &self.layout;
        if layer >= l.n_layers {
            return Err(shape_err("kv", format!("layer {layer} of {}", l.n_layers)));
        }
        let n_blocks = self.n_blocks;
        let mut next_row = 0;
        for s in spans {
            if s.row0 != next_row {
                return Err(shape_err("kv", format!("span starts at row {} instead of {next_row}", s.row0)));
            }
            next_row += s.n_tokens;
            let needed = self.store.blocks_for(l, s.start_pos + s.n_tokens);
            if s.block_table.len() < needed || s.block_table[..needed].iter().any(|&b| b as usize >= n_blocks) {
                return Err(shape_err(
                    "kv",
                    format!("block table does not cover {} positions", s.start_pos + s.n_tokens),
                ));
            }
        }
        if next_row != rows {
            return Err(shape_err("kv", format!("spans cover {next_row} rows of {rows}")));
        }
        Ok(())
    }
}
