//! The wgpu side of a device: buffer pool, pipeline cache, and the batch of
//! recorded dispatches that is submitted only when full or when data is read.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};

/// A WGSL source known at compile time. `name` keys the module cache; `file` is its
/// `shaders/` file (a tiled variant is that file behind a prelude of tile constants); a
/// `fragment` (another file in `shaders/`, or "") goes first, e.g. the workgroup reductions.
#[derive(Debug)]
pub struct Shader {
    pub name: &'static str,
    pub file: &'static str,
    pub fragment: &'static str,
    pub source: &'static str,
}

/// The fragment whose kernels need the adapter's subgroup operations.
pub const SUBGROUP_FRAGMENT: &str = "reduce_subgroup";

/// Slots per uniform arena, in units of the offset alignment; a batch takes as many arenas
/// as its dispatches need.
const UNIFORM_SLOTS: u64 = 2048;
/// Dispatches recorded before a submit by default, so a long graph starts running early
/// (`VIPO_DISPATCHES_PER_SUBMIT`; 0: submit only when data is read).
const DISPATCHES_PER_SUBMIT: usize = 512;
/// Upload staging held by one batch before it is submitted (uploads are copies recorded in
/// the batch's encoder; their staging buffers live until the GPU has run it).
const STAGING_CAP: u64 = 256 << 20;
/// Timestamp query pairs per timed batch (the timer submits when they run out).
const TIMER_PASSES: u32 = 512;

/// Pool counters, in bytes. `live` is what tensors hold now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub live_bytes: u64,
    pub peak_live_bytes: u64,
    pub free_bytes: u64,
    pub device_allocations: u64,
    /// Command buffers submitted so far (a readback or a full batch submits).
    pub submits: u64,
}

#[derive(Default)]
struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    staging: Vec<wgpu::Buffer>,
    stats: PoolStats,
}

/// What is recorded and not yet submitted: one command encoder, with one compute pass that
/// consecutive dispatches share (wgpu still orders dispatches that touch the same buffers).
struct Batch {
    // Declared before `encoder`: a pass must end before its encoder goes.
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: Option<wgpu::CommandEncoder>,
    /// Params of every dispatch in the batch, arena after arena.
    uniforms: Vec<u8>,
    dispatches: usize,
    staging_bytes: u64,
}

/// GPU timestamps around every compute pass while `GpuContext::gpu_timer_start` is on: two
/// queries per dispatch, resolved and read back at each submit (a wait per submit: for
/// benchmarks only).
struct Timer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Passes recorded in the current batch.
    passes: u32,
    /// The kernel (shader name, entry point) of each of those passes, in order.
    labels: Vec<(&'static str, &'static str)>,
    /// GPU seconds and passes per kernel, over the passes already read back.
    kernels: HashMap<(&'static str, &'static str), (f64, usize)>,
}

/// One kernel's share of the GPU time read by `GpuContext::gpu_timer_stop`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KernelTime {
    /// The shader's module name (a tiled variant's name says its tile).
    pub shader: &'static str,
    pub entry: &'static str,
    /// GPU seconds summed over its timed dispatches.
    pub seconds: f64,
    pub dispatches: usize,
}

/// What the GPU timer read: seconds in dispatches, and the same time by kernel (most first).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GpuTimes {
    pub seconds: f64,
    pub kernels: Vec<KernelTime>,
}

pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// Index of the adapter in `Instance::enumerate_adapters` order (the N of `gpu:N`).
    pub index: usize,
    uniform_align: u64,
    /// Uniform arenas of `UNIFORM_SLOTS` slots; a batch writes those it used at its submit.
    uniform_bufs: Mutex<Vec<wgpu::Buffer>>,
    checks: wgpu::ShaderRuntimeChecks,
    dispatches_per_submit: std::sync::atomic::AtomicUsize,
    subgroups: std::sync::atomic::AtomicBool,
    f16_math: std::sync::atomic::AtomicBool,
    matmul_split_k: std::sync::atomic::AtomicBool,
    pool: Mutex<Pool>,
    modules: Mutex<HashMap<&'static str, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<(&'static str, &'static str), Arc<wgpu::ComputePipeline>>>,
    batch: Mutex<Batch>,
    timer: Mutex<Option<Timer>>,
    /// `VIPO_SHADER_DIR` is set: module, pipeline and bind-group errors are caught and returned.
    shader_dir: bool,
}

/// What wgpu adds to every kernel at run time, from `VIPO_SHADER_CHECKS`:
/// - `clamp` (default): indices clamped into their arrays and bindings, as wgpu always does;
///   no loop counters and no integer-division guards. wgpu's loop counters (against infinite
///   loops) keep drivers from unrolling the register-blocked loops, and every loop here has a
///   trip count fixed by its arguments; every divisor is a size the host checked non-zero.
/// - `all`: wgpu's defaults (for comparison, or to rule the kernels out when hunting a bug);
/// - `none`: no clamping either; each kernel still guards its own global indices.
fn shader_checks() -> Result<wgpu::ShaderRuntimeChecks> {
    let v = std::env::var("VIPO_SHADER_CHECKS").unwrap_or_default();
    let mut c = wgpu::ShaderRuntimeChecks::checked();
    match v.as_str() {
        "" | "clamp" => {
            c.force_loop_bounding = false;
            c.int_div_checks = false;
        }
        "all" => {}
        "none" => {
            // SAFETY (of what this promises wgpu): see above; the kernels' own guards are
            // what the GPU-vs-CPU tests exercise at sizes that are not tile multiples.
            c = wgpu::ShaderRuntimeChecks::unchecked();
        }
        other => {
            return Err(Error::Gpu(format!("VIPO_SHADER_CHECKS={other:?}: expected clamp (default), all or none")))
        }
    }
    Ok(c)
}

/// An opt-in switch from the environment: `1` on, unset, empty or `0` off (`VIPO_F16_MATH`:
/// f16 arithmetic for f16 operands; `VIPO_MATMUL_SPLIT_K`: split-K for few-tile matmuls).
fn env_switch(name: &str) -> Result<bool> {
    match std::env::var(name).as_deref() {
        Err(_) | Ok("") | Ok("0") => Ok(false),
        Ok("1") => Ok(true),
        Ok(v) => Err(Error::Gpu(format!("{name}={v:?}: expected 0 or 1"))),
    }
}

/// `VIPO_DISPATCHES_PER_SUBMIT`: dispatches recorded before the batch is submitted without
/// waiting for a read (default 512; 0: never, so a training step's graph up to its first read
/// is one command buffer).
fn dispatches_per_submit() -> Result<usize> {
    match std::env::var("VIPO_DISPATCHES_PER_SUBMIT") {
        Err(_) => Ok(DISPATCHES_PER_SUBMIT),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(0) => Ok(usize::MAX),
            Ok(n) => Ok(n),
            Err(_) => Err(Error::Gpu(format!("VIPO_DISPATCHES_PER_SUBMIT={v:?}: expected a count (0: only on reads)"))),
        },
    }
}

/// `VIPO_SHADER_DIR`: a kernel developer's override. A module whose name has a file there
/// (`<name>.wgsl`: the whole source, tile constants included, e.g. `matmul_128x128.wgsl`) is
/// built from that file instead of the compiled-in source, so a variant can be timed on a
/// GPU without rebuilding. It must keep the module's entry points and the bindings each one
/// uses; a file that does not compile, or does not fit, is an error naming it.
fn shader_override(name: &str) -> Option<(String, std::path::PathBuf)> {
    let dir = std::env::var_os("VIPO_SHADER_DIR")?;
    let path = std::path::Path::new(&dir).join(format!("{name}.wgsl"));
    let text = std::fs::read_to_string(&path).ok()?;
    Some((text, path))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later GPU call into a poison error.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pool buckets: powers of two below 1 MiB, then steps of 1/8 of the power of two below,
/// so that a steady loop finds its buffers again while waste stays under 12.5% for big tensors.
pub(crate) fn bucket_size(bytes: u64) -> u64 {
    let b = bytes.max(16);
    let p = b.next_power_of_two();
    if p <= 1 << 20 {
        return p;
    }
    let step = (p / 2) / 8;
    b.div_ceil(step) * step
}

impl GpuContext {
    pub(crate) fn new(adapter: &wgpu::Adapter, index: usize) -> Result<Self> {
        let info = adapter.get_info();
        let checks = shader_checks()?;
        let alimits = adapter.limits();
        // Take what the adapter offers for the limits compute cares about, defaults elsewhere.
        let mut limits = wgpu::Limits::downlevel_defaults();
        limits.max_storage_buffer_binding_size = alimits.max_storage_buffer_binding_size;
        limits.max_buffer_size = alimits.max_buffer_size;
        limits.max_storage_buffers_per_shader_stage = alimits.max_storage_buffers_per_shader_stage.min(16);
        limits.max_compute_workgroup_storage_size = alimits.max_compute_workgroup_storage_size;
        limits.max_compute_invocations_per_workgroup = alimits.max_compute_invocations_per_workgroup;
        limits.max_compute_workgroup_size_x = alimits.max_compute_workgroup_size_x;
        limits.max_compute_workgroup_size_y = alimits.max_compute_workgroup_size_y;
        limits.max_compute_workgroup_size_z = alimits.max_compute_workgroup_size_z;
        limits.max_compute_workgroups_per_dimension = alimits.max_compute_workgroups_per_dimension;
        limits.max_uniform_buffer_binding_size = alimits.max_uniform_buffer_binding_size;
        limits.min_uniform_buffer_offset_alignment = alimits.min_uniform_buffer_offset_alignment;
        limits.min_storage_buffer_offset_alignment = alimits.min_storage_buffer_offset_alignment;
        let wanted = wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let features = adapter.features() & wanted;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("vipo"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::Gpu(format!("cannot open {} ({:?}): {e}", info.name, info.backend)))?;
        let uniform_align = u64::from(limits.min_uniform_buffer_offset_alignment).max(16);
        let dispatches_per_submit = dispatches_per_submit()?;
        Ok(GpuContext {
            device,
            queue,
            info,
            features,
            limits,
            index,
            uniform_align,
            uniform_bufs: Mutex::new(Vec::new()),
            checks,
            dispatches_per_submit: std::sync::atomic::AtomicUsize::new(dispatches_per_submit),
            subgroups: std::sync::atomic::AtomicBool::new(features.contains(wgpu::Features::SUBGROUP)),
            f16_math: std::sync::atomic::AtomicBool::new(
                env_switch("VIPO_F16_MATH")? && features.contains(wgpu::Features::SHADER_F16),
            ),
            matmul_split_k: std::sync::atomic::AtomicBool::new(env_switch("VIPO_MATMUL_SPLIT_K")?),
            pool: Mutex::new(Pool::default()),
            modules: Mutex::new(HashMap::new()),
            shader_dir: std::env::var_os("VIPO_SHADER_DIR").is_some(),
            pipelines: Mutex::new(HashMap::new()),
            batch: Mutex::new(Batch {
                pass: None,
                encoder: None,
                uniforms: Vec::new(),
                dispatches: 0,
                staging_bytes: 0,
            }),
            timer: Mutex::new(None),
        })
    }

    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    pub fn pool_stats(&self) -> PoolStats {
        lock(&self.pool).stats
    }

    /// Resets the peak counter to the current live bytes (for per-step peaks).
    pub fn reset_peak(&self) {
        let mut p = lock(&self.pool);
        p.stats.peak_live_bytes = p.stats.live_bytes;
    }

    /// Gives the pool's free buffers back to the driver.
    pub fn trim(&self) {
        let mut p = lock(&self.pool);
        p.free.clear();
        p.staging.clear();
        p.stats.free_bytes = 0;
    }

    /// A storage buffer of at least `bytes`, from the pool when one of its bucket is free.
    pub(crate) fn alloc(self: &Arc<Self>, op: &'static str, bytes: u64) -> Result<GpuBuffer> {
        let limit = self.limits.max_storage_buffer_binding_size;
        if bytes > limit {
            return Err(Error::TooLarge { op, bytes, limit });
        }
        let bucket = bucket_size(bytes).min(limit.max(bytes.next_multiple_of(4)));
        let mut p = lock(&self.pool);
        let buf = match p.free.get_mut(&bucket).and_then(|v| v.pop()) {
            Some(b) => {
                p.stats.free_bytes -= bucket;
                b
            }
            None => {
                p.stats.device_allocations += 1;
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(op),
                    size: bucket,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            }
        };
        p.stats.live_bytes += bucket;
        p.stats.peak_live_bytes = p.stats.peak_live_bytes.max(p.stats.live_bytes);
        Ok(GpuBuffer { ctx: self.clone(), buf: Some(buf), bytes, bucket })
    }

    fn release(&self, buf: wgpu::Buffer, bucket: u64) {
        let mut p = lock(&self.pool);
        p.stats.live_bytes -= bucket;
        p.stats.free_bytes += bucket;
        p.free.entry(bucket).or_default().push(buf);
    }

    /// Writes host bytes into a buffer, as a copy recorded in the batch: it runs after the
    /// dispatches recorded before it (a pooled buffer may still be read by its previous owner's
    /// dispatches) without submitting them.
    pub(crate) fn write(&self, buf: &GpuBuffer, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut padded;
        let bytes = if data.len().is_multiple_of(4) {
            data
        } else {
            padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4), 0);
            &padded
        };
        let size = bytes.len() as u64;
        let mut b = lock(&self.batch);
        if b.staging_bytes > 0 && b.staging_bytes + size > STAGING_CAP {
            self.submit_locked(&mut b);
        }
        use wgpu::util::DeviceExt;
        let staging = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("vipo upload"),
            contents: bytes,
            usage: wgpu::BufferUsages::COPY_SRC,
        });
        b.staging_bytes += size;
        self.encoder(&mut b).copy_buffer_to_buffer(&staging, 0, buf.raw(), 0, size);
    }

    /// Reads `bytes` bytes back; submits everything pending and waits.
    pub(crate) fn read(&self, buf: &GpuBuffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let size = bytes.next_multiple_of(4);
        let staging = {
            let mut p = lock(&self.pool);
            match p.staging.iter().position(|s| s.size() >= size) {
                Some(i) => p.staging.swap_remove(i),
                None => self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("vipo readback"),
                    size: bucket_size(size),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
            }
        };
        {
            let mut b = lock(&self.batch);
            let enc = self.encoder(&mut b);
            enc.copy_buffer_to_buffer(buf.raw(), 0, &staging, 0, size);
            self.submit_locked(&mut b);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..size, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for readback: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Gpu("readback callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping readback buffer: {e}")))?;
        let out = {
            let view = staging.get_mapped_range(0..size).map_err(|e| Error::Gpu(format!("readback view: {e:?}")))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        lock(&self.pool).staging.push(staging);
        Ok(out)
    }

    /// The batch's encoder, for a command outside compute passes (the shared pass ends).
    fn encoder<'a>(&self, b: &'a mut Batch) -> &'a mut wgpu::CommandEncoder {
        b.pass = None;
        b.encoder.get_or_insert_with(|| {
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("vipo batch") })
        })
    }

    /// The compute pass that consecutive dispatches share.
    fn shared_pass<'a>(&self, b: &'a mut Batch) -> &'a mut wgpu::ComputePass<'static> {
        let pass = match b.pass.take() {
            Some(p) => p,
            None => {
                let desc = wgpu::ComputePassDescriptor { label: Some("vipo"), timestamp_writes: None };
                self.encoder(b).begin_compute_pass(&desc).forget_lifetime()
            }
        };
        b.pass.insert(pass)
    }

    fn submit_locked(&self, b: &mut Batch) {
        b.pass = None;
        let Some(mut enc) = b.encoder.take() else { return };
        if !b.uniforms.is_empty() {
            let arena = self.uniform_align * UNIFORM_SLOTS;
            let bufs = lock(&self.uniform_bufs);
            for (k, chunk) in b.uniforms.chunks(arena as usize).enumerate() {
                self.queue.write_buffer(&bufs[k], 0, chunk);
            }
            b.uniforms.clear();
        }
        b.staging_bytes = 0;
        let mut timer = lock(&self.timer);
        let timed = match timer.as_mut() {
            Some(t) if t.passes > 0 => {
                let n = 2 * t.passes;
                enc.resolve_query_set(&t.queries, 0..n, &t.resolve, 0);
                enc.copy_buffer_to_buffer(&t.resolve, 0, &t.readback, 0, u64::from(n) * 8);
                Some(n)
            }
            _ => None,
        };
        self.queue.submit(Some(enc.finish()));
        b.dispatches = 0;
        lock(&self.pool).stats.submits += 1;
        if let (Some(n), Some(t)) = (timed, timer.as_mut()) {
            let times = self.read_timestamps(&t.readback, n);
            for (label, secs) in t.labels.drain(..).zip(times) {
                let k = t.kernels.entry(label).or_default();
                k.0 += secs;
                k.1 += 1;
            }
            t.passes = 0;
        }
    }

    /// Seconds of each of the `n / 2` query pairs (end - begin) in `readback`; waits for the
    /// GPU. A failed map reads nothing (timing is a measurement aid, never an error).
    fn read_timestamps(&self, readback: &wgpu::Buffer, n: u32) -> Vec<f64> {
        let bytes = u64::from(n) * 8;
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        if self.device.poll(wgpu::PollType::wait_indefinitely()).is_err() || !matches!(rx.recv(), Ok(Ok(()))) {
            return Vec::new();
        }
        let tick = f64::from(self.queue.get_timestamp_period()) * 1e-9;
        let times = match readback.get_mapped_range(0..bytes) {
            Ok(view) => {
                let t: &[u64] = bytemuck::cast_slice(&view);
                t.chunks_exact(2).map(|p| p[1].saturating_sub(p[0]) as f64 * tick).collect()
            }
            Err(_) => Vec::new(),
        };
        readback.unmap();
        times
    }

    /// Starts summing the GPU time of every dispatch from here (timestamp queries around each
    /// compute pass); false, and nothing timed, where the adapter has no timestamps.
    pub fn gpu_timer_start(&self) -> bool {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return false;
        }
        self.flush();
        let count = 2 * TIMER_PASSES;
        let buffer = |label, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: u64::from(count) * 8,
                usage,
                mapped_at_creation: false,
            })
        };
        let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("vipo timer"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolve = buffer("vipo timer resolve", wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readback = buffer("vipo timer readback", wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        *lock(&self.timer) =
            Some(Timer { queries, resolve, readback, passes: 0, labels: Vec::new(), kernels: HashMap::new() });
        true
    }

    /// Stops the timer: GPU time spent in the dispatches since `gpu_timer_start`, in all and by
    /// kernel (waits for them), or None when it was not running.
    pub fn gpu_timer_stop(&self) -> Option<GpuTimes> {
        self.flush();
        let t = lock(&self.timer).take()?;
        let mut kernels: Vec<KernelTime> = t
            .kernels
            .into_iter()
            .map(|((shader, entry), (seconds, dispatches))| KernelTime { shader, entry, seconds, dispatches })
            .collect();
        kernels.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.shader.cmp(b.shader)));
        Some(GpuTimes { seconds: kernels.iter().map(|k| k.seconds).sum(), kernels })
    }

    /// Dispatches recorded before a submit that no read asked for (0: submit only on reads,
    /// so everything up to a read is one command buffer). Default from
    /// `VIPO_DISPATCHES_PER_SUBMIT`, else 512.
    pub fn set_dispatches_per_submit(&self, n: usize) {
        let n = if n == 0 { usize::MAX } else { n };
        self.dispatches_per_submit.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether kernels use their subgroup variants (reductions): the adapter's SUBGROUP
    /// feature, unless turned off with [`Self::set_subgroups`].
    pub fn subgroups(&self) -> bool {
        self.subgroups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether matmuls with f16 operands multiply in f16 (f16 tiles, each K step's products
    /// summed in f16, f32 across steps) rather than widening to f32: off unless
    /// `VIPO_F16_MATH=1` or [`Self::set_f16_math`], and only where the adapter has SHADER_F16.
    /// f16 has 11 bits of precision and overflows past 65504, so this is an opt-in speed trade.
    pub fn f16_math(&self) -> bool {
        self.f16_math.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns f16 arithmetic on (where the adapter has SHADER_F16) or off.
    pub fn set_f16_math(&self, on: bool) {
        let on = on && self.features.contains(wgpu::Features::SHADER_F16);
        self.f16_math.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether matmuls with fewer output tiles than fill the GPU (`matmul::k_splits`: a LoRA
    /// adapter's gradients, 4 rows or columns by K = tokens) split K over several workgroups and
    /// add the partials in a second kernel. Off unless `VIPO_MATMUL_SPLIT_K=1` or
    /// [`Self::set_matmul_split_k`]: the convolutions' split-K was timed on an H100, this one
    /// not yet. Results differ from the unsplit product by f32 rounding only.
    pub fn matmul_split_k(&self) -> bool {
        self.matmul_split_k.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_matmul_split_k(&self, on: bool) {
        self.matmul_split_k.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns the subgroup variants off (or back on where the adapter has subgroups): to
    /// compare both on one adapter.
    pub fn set_subgroups(&self, on: bool) {
        let on = on && self.features.contains(wgpu::Features::SUBGROUP);
        self.subgroups.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Submits what is recorded, without waiting.
    pub fn flush(&self) {
        let mut b = lock(&self.batch);
        self.submit_locked(&mut b);
    }

    /// Submits and waits until the GPU is idle (for timing).
    pub fn sync(&self) -> Result<()> {
        self.flush();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("waiting for the queue: {e}")))?;
        Ok(())
    }

    /// The module of `shader`: from `VIPO_SHADER_DIR` where that has a file for it (an error
    /// naming the file if it does not compile), else the built-in source.
    fn module(&self, shader: &'static Shader) -> Result<wgpu::ShaderModule> {
        if let Some((text, path)) = shader_override(shader.name) {
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(shader.name),
                source: wgpu::ShaderSource::Wgsl(text.into()),
            };
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            // SAFETY: an untested variant keeps wgpu's index clamping, whatever
            // VIPO_SHADER_CHECKS says: loop counters and division guards are off as for ours.
            let checks = wgpu::ShaderRuntimeChecks { bounds_checks: true, ..self.checks };
            let m = unsafe { self.device.create_shader_module_trusted(desc, checks) };
            if let Some(e) = pollster::block_on(scope.pop()) {
                return Err(Error::Gpu(format!("VIPO_SHADER_DIR: {}: {e}", path.display())));
            }
            eprintln!("VIPO_SHADER_DIR: {} from {}", shader.name, path.display());
            return Ok(m);
        }
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(shader.name),
            source: wgpu::ShaderSource::Wgsl(shader.source.into()),
        };
        // SAFETY: only our own kernels from `shaders/` reach here; `shader_checks` says
        // which of wgpu's run-time checks they do without, and why that holds for them.
        Ok(unsafe { self.device.create_shader_module_trusted(desc, self.checks) })
    }

    fn pipeline(&self, shader: &'static Shader, entry: &'static str) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = lock(&self.pipelines).get(&(shader.name, entry)) {
            return Ok(p.clone());
        }
        let mut modules = lock(&self.modules);
        let module = match modules.entry(shader.name) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.module(shader)?),
        };
        // A variant from VIPO_SHADER_DIR may lack the entry point: an error, not wgpu's panic.
        let scope = self.shader_dir.then(|| self.device.push_error_scope(wgpu::ErrorFilter::Validation));
        let p = Arc::new(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        }));
        if let Some(e) = scope.and_then(|s| pollster::block_on(s.pop())) {
            return Err(Error::Gpu(format!("VIPO_SHADER_DIR: {} entry point {entry}: {e}", shader.name)));
        }
        lock(&self.pipelines).insert((shader.name, entry), p.clone());
        Ok(p)
    }

    /// Records one dispatch: binding 0 is `params` (a uniform), bindings 1.. the buffers in order,
    /// each bound to its tensor's byte length.
    pub(crate) fn dispatch<P: bytemuck::Pod>(
        &self,
        shader: &'static Shader,
        entry: &'static str,
        params: &P,
        buffers: &[&GpuBuffer],
        groups: [u32; 3],
    ) -> Result<()> {
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Gpu(format!(
                "{entry}: dispatch of {groups:?} workgroups exceeds the adapter's {max} per dimension"
            )));
        }
        if groups.contains(&0) {
            return Ok(());
        }
        let pipeline = self.pipeline(shader, entry)?;
        let pbytes = bytemuck::bytes_of(params);
        let psize = (pbytes.len() as u64).next_multiple_of(16);
        let slot = psize.next_multiple_of(self.uniform_align);
        let arena = self.uniform_align * UNIFORM_SLOTS;
        let mut b = lock(&self.batch);
        let timer_full = lock(&self.timer).as_ref().is_some_and(|t| t.passes >= TIMER_PASSES);
        if b.dispatches >= self.dispatches_per_submit.load(std::sync::atomic::Ordering::Relaxed) || timer_full {
            self.submit_locked(&mut b);
        }
        // A slot never straddles two arenas.
        let mut offset = b.uniforms.len() as u64;
        if offset % arena + slot > arena {
            offset = offset.next_multiple_of(arena);
        }
        let (k, in_arena) = ((offset / arena) as usize, offset % arena);
        b.uniforms.resize(offset as usize, 0);
        b.uniforms.extend_from_slice(pbytes);
        b.uniforms.resize((offset + slot) as usize, 0);
        let uniform = {
            let mut bufs = lock(&self.uniform_bufs);
            while bufs.len() <= k {
                bufs.push(self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("vipo params"),
                    size: arena,
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }));
            }
            bufs[k].clone()
        };
        let mut entries = Vec::with_capacity(buffers.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &uniform,
                offset: in_arena,
                size: NonZeroU64::new(psize),
            }),
        });
        for (i, buf) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: buf.raw(),
                    offset: 0,
                    size: NonZeroU64::new(buf.bytes.next_multiple_of(4).max(4)),
                }),
            });
        }
        // A variant from VIPO_SHADER_DIR may bind other buffers than the host passes.
        let scope = self.shader_dir.then(|| self.device.push_error_scope(wgpu::ErrorFilter::Validation));
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        if let Some(e) = scope.and_then(|s| pollster::block_on(s.pop())) {
            return Err(Error::Gpu(format!("VIPO_SHADER_DIR: {} entry point {entry}: bindings: {e}", shader.name)));
        }
        let mut timer = lock(&self.timer);
        match timer.as_mut() {
            // Timed: a pass of its own, with timestamps at its start and end.
            Some(t) => {
                t.passes += 1;
                t.labels.push((shader.name, entry));
                let timestamp_writes = wgpu::ComputePassTimestampWrites {
                    query_set: &t.queries,
                    beginning_of_pass_write_index: Some(2 * t.passes - 2),
                    end_of_pass_write_index: Some(2 * t.passes - 1),
                };
                let desc = wgpu::ComputePassDescriptor { label: Some(entry), timestamp_writes: Some(timestamp_writes) };
                let mut pass = self.encoder(&mut b).begin_compute_pass(&desc);
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
            None => {
                let pass = self.shared_pass(&mut b);
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
            }
        }
        drop(timer);
        b.dispatches += 1;
        Ok(())
    }

    /// Splits `n` workgroups over x and y so neither exceeds the per-dimension limit.
    /// Shaders rebuild the linear id as `wid.y * nwg.x + wid.x`.
    pub(crate) fn grid(&self, n: u64) -> [u32; 3] {
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension.max(1));
        if n <= max {
            [n as u32, 1, 1]
        } else {
            let y = n.div_ceil(max);
            [n.div_ceil(y) as u32, y as u32, 1]
        }
    }
}

/// A pooled storage buffer holding `bytes` bytes of a tensor; returns to the pool on drop.
pub struct GpuBuffer {
    ctx: Arc<GpuContext>,
    buf: Option<wgpu::Buffer>,
    pub(crate) bytes: u64,
    bucket: u64,
}

impl GpuBuffer {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        // Only `drop` takes the buffer out.
        self.buf.as_ref().expect("GpuBuffer used after drop")
    }
    pub fn ctx(&self) -> &Arc<GpuContext> {
        &self.ctx
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.ctx.release(b, self.bucket);
        }
    }
}

impl std::fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuffer({} bytes on {})", self.bytes, self.ctx.info.name)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket_size;

    #[test]
    fn buckets_cover_and_bound_waste() {
        for bytes in [1u64, 17, 255, 256, 257, 1 << 20, (1 << 20) + 1, 5_000_000, 123_456_789] {
            let b = bucket_size(bytes);
            assert!(b >= bytes, "{bytes} -> {b}");
            if bytes > 1 << 20 {
                assert!((b - bytes) * 8 <= b, "{bytes} -> {b} wastes more than 1/8");
            }
        }
    }
}
