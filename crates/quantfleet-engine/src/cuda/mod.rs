//! The GPU backend: the engine's `Backend` over the CUDA kernels of `quantfleet-kernels`, generic over the
//! kernel [`Device`]. On a GPU the device is `quantfleet_kernels::cuda::CudaRunner` (feature `cuda`, see
//! the `driver` module); in tests it is the CPU emulator (`EmuRunner`), which runs the very same `.cu` sources and
//! launch descriptions, so the forward pass's sequence of launches is checked against the CPU backend on
//! the real model without a GPU.
//!
//! What runs where:
//! * Activations are f16 on the device (`[rows, cols]` row-major); `to_host` widens to f32.
//! * Weights keep the kernels' packed layouts, which are the engine's `PackedMatrix` layouts: FP8 E4M3 and
//!   INT8 codes with f32 row scales, INT4 nibbles with f32 group scales (the tier's f16 scales widened
//!   exactly) and u8 zero points, BF16 as is. GGUF matrices (the model file's own formats, e.g. Q4_1) have
//!   no kernel: they are dequantized once at load and served as f16 (the format is reported as
//!   `f16(from Q4_1)`). The embedding table is gathered in f16: a packed embedding keeps an f16 copy
//!   next to its packed form (used as the LM head when tied).
//! * The KV cache is one K and one V buffer per layer in the attention kernels' paged layout
//!   (`(block, kv_head, slot, d)`), f16 or FP8 E4M3 with an f32 scale per (token, head).
//! * Prefill and mixed batches use the decode-attention kernel with one "sequence" per batch row: row `r`
//!   of a span attends over its sequence's block table up to its own position, which is causal attention.
//!
//! Refused at load with a clear error (never computed wrongly): AWQ tiers (input scales have no kernel),
//! INT4 group sizes other than 32/64/128/256, KV dtypes other than f16/FP8 (f32, bf16, int8), head
//! dimensions other than 64/128 and more than 8 query heads per KV head.

#[cfg(feature = "cuda")]
pub mod driver;

use std::path::Path;
use std::sync::Mutex;

use half::f16;
use quantfleet_kernels::ops::Act;
use quantfleet_kernels::ops::attention::{self as attn, KvAppendTarget, PagedLayout};
use quantfleet_kernels::ops::gemv::{Fp8Scales, GemvShape, GemvWeights, gemv};
use quantfleet_kernels::ops::layers;
use quantfleet_kernels::{Device, KernelError, Launch};

use crate::backend::{Backend, KvLayout, RopeTable, SeqSpan};
use crate::cpu::{CpuBackend, CpuMatrix};
use crate::dtype::{GgmlType, dequantize_row_reference};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvDtype;
use crate::model::{Layer, Llama, LlamaConfig};
use crate::packed::{PackedFormat, PackedMatrix};
use crate::safetensors::hf::HfCheckpoint;
use crate::tier::LoadOptions;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightTensor;
use quantfleet_api::model::TierSpec;

const ACT: Act = Act::F16;

fn kernel_err(e: KernelError) -> EngineError {
    match e {
        KernelError::InvalidShape { .. } | KernelError::BufferTooSmall { .. } => {
            EngineError::InvalidRequest(e.to_string())
        }
        other => EngineError::Device(other.to_string()),
    }
}

fn unsupported(what: String) -> EngineError {
    EngineError::UnsupportedModel(format!("the CUDA backend {what}"))
}

fn i32_bytes(v: impl IntoIterator<Item = usize>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for x in v {
        let x = i32::try_from(x).map_err(|_| EngineError::InvalidRequest(format!("index {x} exceeds i32")))?;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Ok(out)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes()).collect()
}

/// The engine's backend over a kernel device (a CUDA GPU, or the CPU emulator in tests).
pub struct GpuBackend<D: Device> {
    dev: D,
    label: String,
    /// The last RoPE angles uploaded: one forward step applies the same table to q and k of every layer.
    rope: Mutex<Option<RopeCache<D>>>,
}

struct RopeCache<D: Device> {
    cos: Vec<f32>,
    sin: Vec<f32>,
    cos_dev: D::Buffer,
    sin_dev: D::Buffer,
}

/// A weight matrix on the device, in the layout of the kernel that multiplies it.
pub struct GpuMatrix<D: Device> {
    rows: usize,
    cols: usize,
    weights: Weights<D>,
    /// f16 `[rows, cols]` table for `embed` when the weights are not themselves f16.
    embed_table: Option<D::Buffer>,
    format: String,
    storage_bytes: usize,
}

enum Weights<D: Device> {
    Half {
        w: D::Buffer,
        bf16: bool,
    },
    /// Scales per row, or per (row, group of `group` columns).
    Fp8 {
        codes: D::Buffer,
        scales: D::Buffer,
        group: Option<usize>,
    },
    Int8 {
        codes: D::Buffer,
        scales: D::Buffer,
    },
    Int4 {
        packed: D::Buffer,
        scales: D::Buffer,
        zeros: Option<D::Buffer>,
        group: usize,
    },
}

impl<D: Device> GpuMatrix<D> {
    pub fn format_name(&self) -> &str {
        &self.format
    }

    fn gemv_weights(&self) -> GemvWeights<'_> {
        match &self.weights {
            Weights::Half { w, bf16 } => GemvWeights::Half { w, bf16: *bf16 },
            Weights::Fp8 { codes, scales, group } => {
                let scaling = group.map_or(Fp8Scales::PerChannel, Fp8Scales::PerGroup);
                GemvWeights::Fp8 { codes, scales, scaling }
            }
            Weights::Int8 { codes, scales } => GemvWeights::Int8 { codes, scales },
            Weights::Int4 { packed, scales, zeros, group } => GemvWeights::Int4 {
                packed,
                scales,
                zeros: zeros.as_ref().map(|z| z as &dyn quantfleet_kernels::DeviceBuffer),
                group_size: *group,
            },
        }
    }

    fn embedding_table(&self) -> Option<&D::Buffer> {
        match (&self.weights, &self.embed_table) {
            (_, Some(t)) => Some(t),
            (Weights::Half { w, bf16: false }, None) => Some(w),
            _ => None,
        }
    }
}

/// Row-major f16 activations on the device; the buffer grows and is reused.
pub struct GpuTensor<D: Device> {
    rows: usize,
    cols: usize,
    buf: Option<D::Buffer>,
}

/// Per-layer K and V buffers in the attention kernels' paged layout.
pub struct GpuKvStorage<D: Device> {
    layout: KvLayout,
    dtype: KvDtype,
    n_blocks: usize,
    layers: Vec<LayerKv<D>>,
}

struct LayerKv<D: Device> {
    k: D::Buffer,
    v: D::Buffer,
    /// FP8: f32 scale per (block, kv head, slot) for K and V.
    scales: Option<(D::Buffer, D::Buffer)>,
}

impl<D: Device> GpuKvStorage<D> {
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Spans must tile the batch rows and their block tables cover their positions with valid blocks: the
    /// kernels index without further checks.
    fn check(&self, layer: usize, rows: usize, spans: &[SeqSpan]) -> Result<()> {
        let l = &self.layout;
        if layer >= l.n_layers {
            return Err(EngineError::InvalidRequest(format!("kv: layer {layer} of {}", l.n_layers)));
        }
        let mut next_row = 0;
        for s in spans {
            if s.row0 != next_row {
                return Err(EngineError::InvalidRequest(format!("kv: span at row {} instead of {next_row}", s.row0)));
            }
            next_row += s.n_tokens;
            let needed = (s.start_pos + s.n_tokens).div_ceil(l.block_tokens);
            if s.block_table.len() < needed || s.block_table[..needed].iter().any(|&b| b as usize >= self.n_blocks) {
                return Err(EngineError::InvalidRequest(format!(
                    "kv: block table does not cover {} positions",
                    s.start_pos + s.n_tokens
                )));
            }
        }
        if next_row != rows {
            return Err(EngineError::InvalidRequest(format!("kv: spans cover {next_row} rows of {rows}")));
        }
        Ok(())
    }

    fn paged(&self, batch: usize, n_heads: usize, max_blocks: usize) -> PagedLayout {
        let l = &self.layout;
        PagedLayout {
            batch,
            n_heads,
            n_kv_heads: l.n_kv_heads,
            head_dim: l.head_dim,
            block_size: l.block_tokens,
            num_blocks: self.n_blocks,
            max_blocks,
        }
    }
}

/// The model shapes the kernels serve (checked at load, so a model they cannot run is refused up front).
pub fn check_config(c: &LlamaConfig) -> Result<()> {
    if !matches!(c.head_dim, 64 | 128) {
        return Err(unsupported(format!(
            "has attention kernels for head_dim 64 and 128, the model has {}",
            c.head_dim
        )));
    }
    if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) || c.n_heads / c.n_kv_heads > attn::MAX_GQA_GROUP {
        return Err(unsupported(format!(
            "serves up to {} query heads per KV head; the model has {} query and {} KV heads",
            attn::MAX_GQA_GROUP,
            c.n_heads,
            c.n_kv_heads
        )));
    }
    Ok(())
}

/// The KV dtypes the attention kernels read.
pub fn check_kv_dtype(dtype: KvDtype) -> Result<()> {
    match dtype {
        KvDtype::F16 | KvDtype::Fp8E4m3 => Ok(()),
        other => {
            Err(unsupported(format!("has attention kernels for fp16 and fp8-e4m3 KV caches, not {}", other.name())))
        }
    }
}

impl<D: Device> GpuBackend<D> {
    /// A backend on `dev`; `label` is what `name()` reports (e.g. "cuda:0 NVIDIA H100 80GB HBM3 sm_90").
    pub fn new(dev: D, label: impl Into<String>) -> Self {
        Self { dev, label: label.into(), rope: Mutex::new(None) }
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    fn run(&self, launch: Result<Launch, KernelError>) -> Result<()> {
        let launch = launch.map_err(kernel_err)?;
        self.dev.run(&launch).map_err(kernel_err)
    }

    fn upload(&self, bytes: &[u8]) -> Result<D::Buffer> {
        self.dev.upload(bytes).map_err(kernel_err)
    }

    fn buf<'a>(&self, t: &'a GpuTensor<D>, what: &str) -> Result<&'a D::Buffer> {
        t.buf.as_ref().ok_or_else(|| EngineError::InvalidRequest(format!("{what}: empty activations")))
    }

    /// A GGUF matrix (any computable type) dequantized to f16.
    fn upload_gguf(&self, ty: GgmlType, data: &[u8], rows: usize, cols: usize) -> Result<GpuMatrix<D>> {
        if rows == 0 || !data.len().is_multiple_of(rows) {
            return Err(EngineError::InvalidRequest(format!("{} matrix of {rows} rows", ty.name())));
        }
        let row_bytes = data.len() / rows;
        let mut row = vec![0f32; cols];
        let mut out = Vec::with_capacity(2 * rows * cols);
        for r in 0..rows {
            dequantize_row_reference(ty, &data[r * row_bytes..(r + 1) * row_bytes], &mut row)?;
            out.extend_from_slice(&f16_bytes(&row));
        }
        Ok(GpuMatrix {
            rows,
            cols,
            weights: Weights::Half { w: self.upload(&out)?, bf16: false },
            embed_table: None,
            format: format!("f16(from {})", ty.name()),
            storage_bytes: out.len(),
        })
    }

    /// A packed matrix that is also the embedding table: the packed form serves the LM head (when tied), an
    /// f16 copy the row gather.
    pub fn upload_packed_embedding(&self, p: PackedMatrix) -> Result<GpuMatrix<D>> {
        let mut table = Vec::with_capacity(2 * p.rows * p.cols);
        let mut row = vec![0f32; p.cols];
        for r in 0..p.rows {
            p.dequantize_row_reference(r, &mut row)?;
            table.extend_from_slice(&f16_bytes(&row));
        }
        let mut m = self.upload_packed(p)?;
        m.embed_table = Some(self.upload(&table)?);
        Ok(m)
    }

    /// Moves a model loaded (and possibly re-quantized for a tier) on the CPU to this device.
    pub fn adopt(self, cpu: Llama<CpuBackend>) -> Result<Llama<Self>> {
        check_config(&cpu.config)?;
        let matrix = |m: &CpuMatrix| -> Result<GpuMatrix<D>> {
            match m {
                CpuMatrix::Packed(p) => self.upload_packed(p.clone()),
                CpuMatrix::Gguf { .. } => {
                    let (ty, data) = m.gguf_data().expect("GGUF matrices have a block view");
                    let (rows, cols) = m.shape();
                    self.upload_gguf(ty, data, rows, cols)
                }
            }
        };
        let mut layers = Vec::with_capacity(cpu.layers.len());
        for l in &cpu.layers {
            layers.push(Layer {
                attn_norm: self.upload_vector(&l.attn_norm)?,
                wq: matrix(&l.wq)?,
                wk: matrix(&l.wk)?,
                wv: matrix(&l.wv)?,
                wo: matrix(&l.wo)?,
                ffn_norm: self.upload_vector(&l.ffn_norm)?,
                gate: matrix(&l.gate)?,
                up: matrix(&l.up)?,
                down: matrix(&l.down)?,
            });
        }
        let tok_embd = match &cpu.tok_embd {
            CpuMatrix::Packed(p) => self.upload_packed_embedding(p.clone())?,
            gguf => matrix(gguf)?,
        };
        let output = cpu.output.as_ref().map(matrix).transpose()?;
        let output_norm = self.upload_vector(&cpu.output_norm)?;
        Ok(Llama { backend: self, config: cpu.config, tok_embd, output, output_norm, layers })
    }
}

impl<D: Device> Engine<GpuBackend<D>> {
    /// The model (a GGUF file, or a Hugging Face checkpoint directory as `Engine::open_cpu` reads it) in its
    /// file's own formats, served as f16 weights, with a `kv_dtype` KV cache.
    pub fn open_gpu(backend: GpuBackend<D>, path: &Path, sha256: Option<&str>, kv_dtype: KvDtype) -> Result<Self> {
        check_kv_dtype(kv_dtype)?;
        let mut engine = if path.is_dir() {
            let ckpt = HfCheckpoint::open(path, sha256)?;
            check_config(&ckpt.config)?;
            Engine::from_hf(backend, &ckpt)?
        } else {
            let file = crate::engine::open_file(path, sha256)?;
            check_config(&LlamaConfig::from_gguf(&file)?)?;
            Engine::new(backend, file)?
        };
        engine.kv_dtype = kv_dtype;
        Ok(engine)
    }

    /// The model (GGUF file or HF directory) at a precision tier: quantized on the CPU exactly as
    /// `Engine::open_cpu_tier` does, then uploaded in the kernels' layouts. Tier settings the kernels cannot
    /// serve are refused before the (possibly long) quantization.
    pub fn open_gpu_tier(
        backend: GpuBackend<D>,
        path: &Path,
        sha256: Option<&str>,
        tier: &TierSpec,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let kv_dtype = crate::tier::kv_dtype(tier)?;
        check_kv_dtype(kv_dtype)?;
        let awq = quantfleet_api::vocab::QuantMethod::Awq;
        if tier.weights.method == awq || tier.layer_overrides.iter().any(|o| o.weights.method == awq) {
            return Err(unsupported(format!(
                "has no kernel for AWQ input scales (tier {}): use RTN or GPTQ",
                tier.name
            )));
        }
        // Opening maps the file and reads its headers (cheap): the kernels' limits are checked before the
        // tier's quantization, which `open_cpu_tier` would run first.
        let Engine { model: mut cpu, tokenizer, .. } = Engine::open_cpu(path, sha256)?;
        check_config(&cpu.config)?;
        let report = crate::tier::apply_tier(&mut cpu, &tokenizer, tier, opts)?;
        let model = backend.adopt(cpu)?;
        check_vocab(&tokenizer, &model.config)?;
        Ok(Engine { model, tokenizer, tier: Some(report), kv_dtype })
    }
}

fn check_vocab(tokenizer: &Tokenizer, c: &LlamaConfig) -> Result<()> {
    if tokenizer.vocab_size() != c.vocab {
        return Err(EngineError::UnsupportedModel(format!(
            "tokenizer has {} tokens, model {}",
            tokenizer.vocab_size(),
            c.vocab
        )));
    }
    Ok(())
}

fn shape_err(op: &str, detail: String) -> EngineError {
    EngineError::InvalidRequest(format!("{op}: {detail}"))
}

impl<D: Device> Backend for GpuBackend<D> {
    type Matrix = GpuMatrix<D>;
    type Vector = D::Buffer;
    type Activations = GpuTensor<D>;
    type KvStorage = GpuKvStorage<D>;

    fn name(&self) -> String {
        self.label.clone()
    }

    fn upload_weight(&self, w: &WeightTensor) -> Result<GpuMatrix<D>> {
        if w.dims.len() != 2 || !w.ggml_type.is_computable() {
            return Err(EngineError::UnsupportedModel(format!(
                "tensor {} ({} {:?}) is not a 2-D matrix of a supported type",
                w.name,
                w.ggml_type.name(),
                w.dims
            )));
        }
        let (cols, rows) = (w.dims[0] as usize, w.dims[1] as usize);
        self.upload_gguf(w.ggml_type, w.data(), rows, cols)
    }

    fn upload_packed(&self, p: PackedMatrix) -> Result<GpuMatrix<D>> {
        p.validate()?;
        // A matrix the CPU backend interleaved for its kernels (`adopt`): the GPU kernels read rows.
        let p = p.into_rows_layout()?;
        if p.input_scales.is_some() {
            return Err(unsupported("has no kernel for AWQ/SmoothQuant input scales".into()));
        }
        // BF16 activations: the device's activations are f16, at least bf16's precision in this range.
        if p.activations == crate::packed::ActivationQuant::Int8 {
            return Err(unsupported("has no INT8-activation (W8A8/W4A8) kernels".into()));
        }
        let storage_bytes = p.storage_bytes();
        let format = p.format.name();
        let weights = match p.format {
            PackedFormat::Bf16 => Weights::Half { w: self.upload(&p.data)?, bf16: true },
            // The row layout: scales per row, or per (row, group) in row order, as the kernel reads them.
            PackedFormat::Fp8E4m3 { group } => {
                Weights::Fp8 { codes: self.upload(&p.data)?, scales: self.upload(&f32_bytes(&p.f32_scales))?, group }
            }
            PackedFormat::Int8 => {
                Weights::Int8 { codes: self.upload(&p.data)?, scales: self.upload(&f32_bytes(&p.f32_scales))? }
            }
            PackedFormat::Int4 { group, symmetric } => {
                if !matches!(group, 32 | 64 | 128 | 256) {
                    return Err(unsupported(format!("has INT4 kernels for groups of 32/64/128/256, not {group}")));
                }
                let scales: Vec<f32> = p.group_scales.iter().map(|s| s.to_f32()).collect();
                Weights::Int4 {
                    packed: self.upload(&p.data)?,
                    scales: self.upload(&f32_bytes(&scales))?,
                    zeros: if symmetric { None } else { Some(self.upload(&p.zeros)?) },
                    group,
                }
            }
        };
        Ok(GpuMatrix { rows: p.rows, cols: p.cols, weights, embed_table: None, format, storage_bytes })
    }

    fn matrix_storage_bytes(&self, m: &GpuMatrix<D>) -> usize {
        m.storage_bytes
    }

    fn upload_vector(&self, values: &[f32]) -> Result<D::Buffer> {
        self.upload(&f32_bytes(values))
    }

    fn matrix_shape(&self, m: &GpuMatrix<D>) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn new_activations(&self) -> GpuTensor<D> {
        GpuTensor { rows: 0, cols: 0, buf: None }
    }

    fn resize(&self, a: &mut GpuTensor<D>, rows: usize, cols: usize) -> Result<()> {
        let bytes = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(2))
            .ok_or_else(|| shape_err("resize", format!("{rows} x {cols} overflows")))?;
        if a.buf.as_ref().is_none_or(|b| quantfleet_kernels::DeviceBuffer::byte_len(b) < bytes) {
            a.buf = Some(self.dev.alloc(bytes.max(2)).map_err(kernel_err)?);
        }
        (a.rows, a.cols) = (rows, cols);
        Ok(())
    }

    fn shape(&self, a: &GpuTensor<D>) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn to_host(&self, a: &GpuTensor<D>, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        let n = a.rows * a.cols;
        if n == 0 {
            return Ok(());
        }
        let bytes = self.dev.download(self.buf(a, "to_host")?).map_err(kernel_err)?;
        out.extend(bytes[..2 * n].chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()));
        Ok(())
    }

    fn gather_rows(&self, src: &GpuTensor<D>, rows: &[usize], dst: &mut GpuTensor<D>) -> Result<()> {
        if let Some(&r) = rows.iter().find(|&&r| r >= src.rows) {
            return Err(shape_err("gather_rows", format!("row {r} of {}", src.rows)));
        }
        self.resize(dst, rows.len(), src.cols)?;
        let ids = self.upload(&i32_bytes(rows.iter().copied())?)?;
        let status = self.upload(&[0; 4])?;
        let (s, d) = (self.buf(src, "gather_rows")?, self.buf(dst, "gather_rows")?);
        self.run(layers::embedding(ACT, rows.len(), src.rows, src.cols, s, &ids, d, &status))
    }

    fn embed(&self, table: &GpuMatrix<D>, ids: &[u32], out: &mut GpuTensor<D>) -> Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(EngineError::TokenOutOfRange { id, vocab: table.rows });
        }
        let t = table
            .embedding_table()
            .ok_or_else(|| EngineError::InvalidRequest("embed: this matrix was not uploaded as an embedding".into()))?;
        self.resize(out, ids.len(), table.cols)?;
        let idb = self.upload(&i32_bytes(ids.iter().map(|&i| i as usize))?)?;
        let status = self.upload(&[0; 4])?;
        let o = self.buf(out, "embed")?;
        self.run(layers::embedding(ACT, ids.len(), table.rows, table.cols, t, &idb, o, &status))
    }

    fn matmul(&self, w: &GpuMatrix<D>, x: &GpuTensor<D>, out: &mut GpuTensor<D>) -> Result<()> {
        if x.cols != w.cols {
            return Err(shape_err("matmul", format!("x has {} columns, W has {}", x.cols, w.cols)));
        }
        self.resize(out, x.rows, w.rows)?;
        let shape = GemvShape { n: w.rows, k: w.cols, batch: x.rows };
        self.run(gemv(w.gemv_weights(), ACT, shape, self.buf(x, "matmul")?, self.buf(out, "matmul")?))
    }

    fn rms_norm(&self, x: &GpuTensor<D>, w: &D::Buffer, eps: f32, out: &mut GpuTensor<D>) -> Result<()> {
        self.resize(out, x.rows, x.cols)?;
        let (xb, ob) = (self.buf(x, "rms_norm")?, self.buf(out, "rms_norm")?);
        self.run(layers::rmsnorm(ACT, x.rows, x.cols, xb, w, ob, eps))
    }

    fn rope(&self, x: &mut GpuTensor<D>, head_dim: usize, table: &RopeTable) -> Result<()> {
        let half = head_dim / 2;
        if table.half != half || table.cos.len() != x.rows * half || head_dim == 0 || !x.cols.is_multiple_of(head_dim) {
            return Err(shape_err("rope", format!("table for {} rows x {} pairs", table.cos.len(), table.half)));
        }
        let mut cache = self.rope.lock().map_err(|_| EngineError::Device("rope cache lock poisoned".into()))?;
        if cache.as_ref().is_none_or(|c| c.cos != table.cos || c.sin != table.sin) {
            *cache = Some(RopeCache {
                cos: table.cos.clone(),
                sin: table.sin.clone(),
                cos_dev: self.upload(&f32_bytes(&table.cos))?,
                sin_dev: self.upload(&f32_bytes(&table.sin))?,
            });
        }
        let c = cache.as_ref().expect("filled above");
        let xb = self.buf(x, "rope")?;
        self.run(layers::rope_table(ACT, x.rows, x.cols / head_dim, head_dim, xb, &c.cos_dev, &c.sin_dev))
    }

    fn swiglu(&self, gate: &GpuTensor<D>, up: &GpuTensor<D>, out: &mut GpuTensor<D>) -> Result<()> {
        if (gate.rows, gate.cols) != (up.rows, up.cols) {
            return Err(shape_err("swiglu", "gate and up shapes differ".into()));
        }
        self.resize(out, gate.rows, gate.cols)?;
        let (g, u, o) = (self.buf(gate, "swiglu")?, self.buf(up, "swiglu")?, self.buf(out, "swiglu")?);
        self.run(layers::swiglu_split(ACT, gate.rows * gate.cols, g, u, o))
    }

    fn add_assign(&self, x: &mut GpuTensor<D>, y: &GpuTensor<D>) -> Result<()> {
        if (x.rows, x.cols) != (y.rows, y.cols) {
            return Err(shape_err("add_assign", "shapes differ".into()));
        }
        self.run(layers::add(ACT, x.rows * x.cols, self.buf(x, "add_assign")?, self.buf(y, "add_assign")?))
    }

    fn new_kv_storage(&self, layout: KvLayout, dtype: KvDtype, n_blocks: usize) -> Result<GpuKvStorage<D>> {
        check_kv_dtype(dtype)?;
        if !matches!(layout.head_dim, 64 | 128) || n_blocks == 0 {
            return Err(unsupported(format!("cannot hold a KV cache of {n_blocks} blocks for {layout:?}")));
        }
        let tokens = n_blocks
            .checked_mul(layout.n_kv_heads * layout.block_tokens)
            .ok_or_else(|| shape_err("kv storage", format!("{n_blocks} blocks overflow")))?;
        let elems = tokens * layout.head_dim;
        let alloc = |bytes: usize| self.dev.alloc(bytes).map_err(kernel_err);
        let mut layers = Vec::with_capacity(layout.n_layers);
        for _ in 0..layout.n_layers {
            layers.push(match dtype {
                KvDtype::F16 => LayerKv { k: alloc(2 * elems)?, v: alloc(2 * elems)?, scales: None },
                _ => LayerKv {
                    k: alloc(elems)?,
                    v: alloc(elems)?,
                    scales: Some((alloc(4 * tokens)?, alloc(4 * tokens)?)),
                },
            });
        }
        Ok(GpuKvStorage { layout, dtype, n_blocks, layers })
    }

    fn kv_write(
        &self,
        kv: &mut GpuKvStorage<D>,
        layer: usize,
        k: &GpuTensor<D>,
        v: &GpuTensor<D>,
        spans: &[SeqSpan<'_>],
    ) -> Result<()> {
        let width = kv.layout.n_kv_heads * kv.layout.head_dim;
        if (k.cols, v.cols) != (width, width) || k.rows != v.rows {
            return Err(shape_err("kv_write", format!("k/v widths {}/{} for {:?}", k.cols, v.cols, kv.layout)));
        }
        kv.check(layer, k.rows, spans)?;
        let bt = kv.layout.block_tokens;
        let slots = spans.iter().flat_map(|s| {
            (s.start_pos..s.start_pos + s.n_tokens).map(move |p| s.block_table[p / bt] as usize * bt + p % bt)
        });
        let slot_mapping = self.upload(&i32_bytes(slots)?)?;
        let paged = kv.paged(k.rows, kv.layout.n_kv_heads, 1);
        let l = &kv.layers[layer];
        let target = match &l.scales {
            None => KvAppendTarget::F16 { slot_mapping: &slot_mapping, k: &l.k, v: &l.v },
            Some((ks, vs)) => {
                KvAppendTarget::Fp8 { slot_mapping: &slot_mapping, k: &l.k, v: &l.v, k_scale: ks, v_scale: vs }
            }
        };
        self.run(attn::kv_append(target, paged, self.buf(k, "kv_write")?, self.buf(v, "kv_write")?))
    }

    fn attention(
        &self,
        q: &GpuTensor<D>,
        kv: &GpuKvStorage<D>,
        layer: usize,
        spans: &[SeqSpan<'_>],
        out: &mut GpuTensor<D>,
    ) -> Result<()> {
        let l = kv.layout;
        if l.head_dim == 0 || !q.cols.is_multiple_of(l.head_dim) {
            return Err(shape_err("attention", format!("q width {} for {l:?}", q.cols)));
        }
        let n_heads = q.cols / l.head_dim;
        kv.check(layer, q.rows, spans)?;
        self.resize(out, q.rows, q.cols)?;
        // One kernel "sequence" per row: row i of a span sees its sequence's blocks up to its own position.
        let max_blocks = spans.iter().map(|s| (s.start_pos + s.n_tokens).div_ceil(l.block_tokens)).max().unwrap_or(1);
        let mut table = Vec::with_capacity(q.rows * max_blocks);
        let mut lens = Vec::with_capacity(q.rows);
        for s in spans {
            let needed = (s.start_pos + s.n_tokens).div_ceil(l.block_tokens);
            for i in 0..s.n_tokens {
                table.extend(s.block_table[..needed].iter().map(|&b| b as usize));
                table.extend(std::iter::repeat_n(0, max_blocks - needed));
                lens.push(s.start_pos + i + 1);
            }
        }
        let (table, lens) = (self.upload(&i32_bytes(table)?)?, self.upload(&i32_bytes(lens)?)?);
        let paged = kv.paged(q.rows, n_heads, max_blocks);
        let layer_kv = &kv.layers[layer];
        let cache = match &layer_kv.scales {
            None => attn::KvCache::F16 { k: &layer_kv.k, v: &layer_kv.v },
            Some((ks, vs)) => attn::KvCache::Fp8 { k: &layer_kv.k, v: &layer_kv.v, k_scale: ks, v_scale: vs },
        };
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        let (qb, ob) = (self.buf(q, "attention")?, self.buf(out, "attention")?);
        // An FP8 cache holds Hadamard-rotated keys and values (kv_append_fp8, as the CPU cache does);
        // attn_decode_fp8 rotates the queries and its output itself.
        self.run(attn::attn_decode(cache, paged, qb, ob, &table, &lens, scale))
    }
}
