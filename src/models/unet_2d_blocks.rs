//! The blocks of diffusers' `UNet2DConditionModel` (`unet_2d_blocks.py`, `transformer_2d.py`,
//! `attention.py`, `resnet.py`), named after the checkpoint keys they load.

use std::cell::Cell;

use crate::error::{Error, Result};
use crate::nn::{Attention, Conv2d, GroupNorm, LayerNorm, Linear, ResnetBlock2D};
use crate::ops::conv2d::ConvAdd;
use crate::params::ParamPath;
use crate::tensor::Tensor;

thread_local! {
    /// Set while a UNet with gradient checkpointing runs its forward on this thread.
    static CHECKPOINTING: Cell<bool> = const { Cell::new(false) };
}

/// Turns activation checkpointing of the blocks' resnets and transformers on for this thread
/// until dropped (diffusers' `enable_gradient_checkpointing`: each module keeps only its inputs
/// and recomputes its forward in the backward).
pub struct CheckpointingGuard(bool);

pub fn checkpointing(on: bool) -> CheckpointingGuard {
    CheckpointingGuard(CHECKPOINTING.with(|c| c.replace(on)))
}

impl Drop for CheckpointingGuard {
    fn drop(&mut self) {
        CHECKPOINTING.with(|c| c.set(self.0));
    }
}

fn checkpointed() -> bool {
    CHECKPOINTING.with(|c| c.get()) && crate::autograd::is_grad_enabled()
}

/// `resnet(x, temb)`, recomputed in the backward when checkpointing.
fn run_resnet(r: &ResnetBlock2D, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
    if !checkpointed() {
        return r.forward(x, Some(temb));
    }
    let r = r.clone();
    crate::autograd::checkpoint(&[x, temb], move |t| r.forward(&t[0], Some(&t[1])))
}

/// `attn(x, context)`, recomputed in the backward when checkpointing.
fn run_attn(a: &Transformer2DModel, x: &Tensor, context: &Tensor) -> Result<Tensor> {
    if !checkpointed() {
        return a.forward(x, context);
    }
    let a = a.clone();
    crate::autograd::checkpoint(&[x, context], move |t| a.forward(&t[0], &t[1]))
}

/// What every block is built with (diffusers passes these to each block alike).
#[derive(Clone, Copy, Debug)]
pub struct BlockOpts {
    /// Width of the time embedding the resnets project.
    pub temb_channels: usize,
    /// Groups of the resnets' and the transformers' group norms.
    pub groups: usize,
    /// Epsilon of the resnets' group norms (the transformers' is fixed at 1e-6).
    pub eps: f32,
    pub use_linear_projection: bool,
}

/// Attention settings of one block level.
#[derive(Clone, Copy, Debug)]
pub struct AttnOpts {
    pub heads: usize,
    /// Width of `encoder_hidden_states`.
    pub cross_attention_dim: usize,
    /// Transformer blocks per `Transformer2DModel`.
    pub layers: usize,
}

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` (dim -> 2 * inner), GEGLU, `net.2` (inner -> dim).
#[derive(Clone)]
pub struct FeedForward {
    pub net_0_proj: Linear,
    pub net_2: Linear,
}

impl FeedForward {
    pub fn load(vb: &ParamPath, dim: usize, inner: usize) -> Result<FeedForward> {
        let net = vb.pp("net");
        Ok(FeedForward {
            net_0_proj: Linear::load(&net.pp(0).pp("proj"), dim, 2 * inner, true)?,
            net_2: Linear::load(&net.pp(2), inner, dim, true)?,
        })
    }

    /// x (B, L, dim) -> (B, L, dim).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_add(x, None)
    }

    /// `forward(x) + residual` (B, L, dim), the residual added by `net.2`.
    pub fn forward_add(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.net_2.forward_add(&self.net_0_proj.forward(x)?.geglu()?, residual)
    }
}

/// diffusers' `BasicTransformerBlock` (layer-norm variant): self-attention, cross-attention
/// over the text, GEGLU feed-forward, each pre-normed and residual.
#[derive(Clone)]
pub struct BasicTransformerBlock {
    /// Checkpoint prefix, e.g. `down_blocks.0.attentions.0.transformer_blocks.0`.
    pub prefix: String,
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(
        vb: &ParamPath,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
    ) -> Result<BasicTransformerBlock> {
        // diffusers' defaults: LayerNorm eps 1e-5, no q/k/v bias, ff mult 4.
        Ok(BasicTransformerBlock {
            prefix: vb.prefix().to_string(),
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cross_attention_dim, heads, head_dim, false)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vb.pp("ff"), dim, 4 * dim)?,
        })
    }

    /// x (B, L, dim), context (B, Lc, cross_attention_dim) -> (B, L, dim).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Each residual is added by the sublayer's output projection as it writes.
        let x = self.attn1.forward_add(&self.norm1.forward(x)?, None, Some(x))?;
        let x = self.attn2.forward_add(&self.norm2.forward(&x)?, Some(context), Some(&x))?;
        self.ff.forward_add(&self.norm3.forward(&x)?, Some(&x))
    }
}

/// `proj_in` / `proj_out`: a 1x1 conv on (B, C, H, W), or a Linear on (B, HW, C) with
/// `use_linear_projection` (SD2.x).
#[derive(Clone)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(vb: &ParamPath, cin: usize, cout: usize, linear: bool) -> Result<Projection> {
        Ok(if linear {
            Projection::Linear(Linear::load(vb, cin, cout, true)?)
        } else {
            Projection::Conv(Conv2d::load(vb, cin, cout, 1, 1, 0)?)
        })
    }
}

/// (B, C, H, W) -> (B, HW, C).
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    let (b, c, hw) = (s[0], s[1], s[2] * s[3]);
    x.permute(&[0, 2, 3, 1])?.reshape_to(&[b, hw, c])
}

/// (B, HW, C) -> (B, C, H, W).
fn to_image(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let s = x.shape();
    let (b, c) = (s[0], s[2]);
    x.reshape_to(&[b, h, w, c])?.permute(&[0, 3, 1, 2])
}

/// diffusers' `Transformer2DModel` on continuous input: group norm, `proj_in`, transformer
/// blocks over the H*W tokens, `proj_out`, plus the input.
#[derive(Clone)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    /// `channels` in and out; the inner width is `heads * (channels / heads)` as in diffusers.
    pub fn load(vb: &ParamPath, channels: usize, opts: &BlockOpts, attn: &AttnOpts) -> Result<Transformer2DModel> {
        let head_dim = channels / attn.heads.max(1);
        if attn.heads == 0 || head_dim == 0 {
            return Err(Error::Invalid(format!(
                "{}: {} attention heads do not fit {channels} channels",
                vb.prefix(),
                attn.heads
            )));
        }
        let inner = attn.heads * head_dim;
        let lin = opts.use_linear_projection;
        let blocks = vb.pp("transformer_blocks");
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&vb.pp("norm"), opts.groups, channels, 1e-6)?,
            proj_in: Projection::load(&vb.pp("proj_in"), channels, inner, lin)?,
            transformer_blocks: (0..attn.layers)
                .map(|i| {
                    BasicTransformerBlock::load(&blocks.pp(i), inner, attn.heads, head_dim, attn.cross_attention_dim)
                })
                .collect::<Result<_>>()?,
            proj_out: Projection::load(&vb.pp("proj_out"), inner, channels, lin)?,
        })
    }

    /// x (B, C, H, W), context (B, Lc, cross_attention_dim) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (h, w) = (x.shape()[2], x.shape()[3]);
        let y = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Projection::Conv(c) => to_tokens(&c.forward(&y)?)?,
            Projection::Linear(l) => l.forward(&to_tokens(&y)?)?,
        }; // (B, HW, inner)
        for block in &self.transformer_blocks {
            t = block.forward(&t, context)?;
        }
        match &self.proj_out {
            // The 1x1 conv adds the residual as it writes (the image layout is the conv's).
            Projection::Conv(c) => c.forward_add(&to_image(&t, h, w)?, ConvAdd { temb: None, residual: Some(x) }),
            Projection::Linear(l) => to_image(&l.forward(&t)?, h, w)?.add(x),
        }
    }
}

/// diffusers' `Downsample2D` with a conv: 3x3, stride 2; padding 0 means one zero row and
/// column added at the bottom and right first, as diffusers does.
#[derive(Clone)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    pub fn load(vb: &ParamPath, channels: usize, padding: usize) -> Result<Downsample2D> {
        Ok(Downsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding)? })
    }

    /// x (B, C, H, W) -> (B, C, H', W').
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.conv.padding == 0 {
            return self.conv.forward(&x.pad_axis(2, 0, 1)?.pad_axis(3, 0, 1)?);
        }
        self.conv.forward(x)
    }
}

/// diffusers' `Upsample2D` with a conv: nearest 2x, then a 3x3 conv.
#[derive(Clone)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: &ParamPath, channels: usize) -> Result<Upsample2D> {
        Ok(Upsample2D { conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1)? })
    }

    /// x (B, C, H, W) -> (B, C, th, tw) with `size` = (th, tw), or (B, C, 2H, 2W).
    /// For an odd target (2H - 1), nearest-neighbour interpolation to that size picks the
    /// same source pixels as the first 2H - 1 of the 2x upsample, so a slice gives
    /// `F.interpolate(size=...)` exactly.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let mut y = x.upsample_nearest2x()?;
        if let Some((th, tw)) = size {
            let (h2, w2) = (y.shape()[2], y.shape()[3]);
            if th > h2 || tw > w2 || th + 1 < h2 || tw + 1 < w2 {
                return Err(Error::shape(
                    "Upsample2D",
                    format!("cannot upsample {:?} to {th}x{tw} (only 2x or 2x - 1)", x.shape()),
                ));
            }
            if th != h2 {
                y = y.slice(2, 0, th)?;
            }
            if tw != w2 {
                y = y.slice(3, 0, tw)?;
            }
        }
        self.conv.forward(&y)
    }
}

/// `CrossAttnDownBlock2D` (resnets each followed by a transformer) or `DownBlock2D`
/// (resnets only), with an optional downsampler.
#[derive(Clone)]
pub enum DownBlock {
    CrossAttnDownBlock2D(CrossAttnDownBlock2D),
    DownBlock2D(DownBlock2D),
}

#[derive(Clone)]
pub struct CrossAttnDownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Option<Downsample2D>,
}

#[derive(Clone)]
pub struct DownBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Option<Downsample2D>,
}

fn load_resnets(
    vb: &ParamPath,
    ins: impl Iterator<Item = usize>,
    cout: usize,
    opts: &BlockOpts,
) -> Result<Vec<ResnetBlock2D>> {
    let r = vb.pp("resnets");
    ins.enumerate()
        .map(|(i, cin)| ResnetBlock2D::load(&r.pp(i), cin, cout, Some(opts.temb_channels), opts.groups, opts.eps))
        .collect()
}

fn load_attentions(
    vb: &ParamPath,
    n: usize,
    channels: usize,
    opts: &BlockOpts,
    attn: &AttnOpts,
) -> Result<Vec<Transformer2DModel>> {
    let a = vb.pp("attentions");
    (0..n).map(|i| Transformer2DModel::load(&a.pp(i), channels, opts, attn)).collect()
}

impl DownBlock {
    /// `attn` Some for `CrossAttnDownBlock2D`; `downsample_padding` Some adds the downsampler.
    pub fn load(
        vb: &ParamPath,
        layers: usize,
        cin: usize,
        cout: usize,
        downsample_padding: Option<usize>,
        opts: &BlockOpts,
        attn: Option<&AttnOpts>,
    ) -> Result<DownBlock> {
        let ins = (0..layers).map(|i| if i == 0 { cin } else { cout });
        let resnets = load_resnets(vb, ins, cout, opts)?;
        let downsamplers =
            downsample_padding.map(|p| Downsample2D::load(&vb.pp("downsamplers").pp(0), cout, p)).transpose()?;
        Ok(match attn {
            Some(a) => DownBlock::CrossAttnDownBlock2D(CrossAttnDownBlock2D {
                resnets,
                attentions: load_attentions(vb, layers, cout, opts, a)?,
                downsamplers,
            }),
            None => DownBlock::DownBlock2D(DownBlock2D { resnets, downsamplers }),
        })
    }

    pub fn resnets(&self) -> &[ResnetBlock2D] {
        match self {
            DownBlock::CrossAttnDownBlock2D(b) => &b.resnets,
            DownBlock::DownBlock2D(b) => &b.resnets,
        }
    }

    pub fn attentions(&self) -> &[Transformer2DModel] {
        match self {
            DownBlock::CrossAttnDownBlock2D(b) => &b.attentions,
            DownBlock::DownBlock2D(_) => &[],
        }
    }

    fn downsamplers(&self) -> Option<&Downsample2D> {
        match self {
            DownBlock::CrossAttnDownBlock2D(b) => b.downsamplers.as_ref(),
            DownBlock::DownBlock2D(b) => b.downsamplers.as_ref(),
        }
    }

    /// x (B, Cin, H, W), temb (B, T), context (B, Lc, Cc) -> the output and the skip
    /// tensors (one per resnet, plus the downsampled output), in diffusers' order.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::new();
        let attentions = self.attentions();
        for (i, resnet) in self.resnets().iter().enumerate() {
            h = run_resnet(resnet, &h, temb)?;
            if let Some(attn) = attentions.get(i) {
                h = run_attn(attn, &h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = self.downsamplers() {
            h = d.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) per layer (one in SD).
#[derive(Clone)]
pub struct UNetMidBlock2DCrossAttn {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    pub fn load(
        vb: &ParamPath,
        channels: usize,
        output_scale_factor: f32,
        opts: &BlockOpts,
        attn: &AttnOpts,
    ) -> Result<UNetMidBlock2DCrossAttn> {
        let mut resnets = load_resnets(vb, [channels; 2].into_iter(), channels, opts)?;
        for r in &mut resnets {
            r.output_scale_factor = output_scale_factor;
        }
        Ok(UNetMidBlock2DCrossAttn { resnets, attentions: load_attentions(vb, 1, channels, opts, attn)? })
    }

    /// x (B, C, H, W), temb (B, T), context (B, Lc, Cc) -> (B, C, H, W).
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = run_resnet(&self.resnets[0], x, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = run_attn(attn, &h, context)?;
            h = run_resnet(resnet, &h, temb)?;
        }
        Ok(h)
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`: each resnet takes the running tensor concatenated
/// (channels) with the next skip from the end, then an optional upsampler.
#[derive(Clone)]
pub enum UpBlock {
    CrossAttnUpBlock2D(CrossAttnUpBlock2D),
    UpBlock2D(UpBlock2D),
}

#[derive(Clone)]
pub struct CrossAttnUpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Option<Upsample2D>,
}

#[derive(Clone)]
pub struct UpBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Option<Upsample2D>,
}

impl UpBlock {
    /// diffusers' channel bookkeeping: resnet i takes `prev_out` (i = 0) or `cout`, plus the
    /// skip's channels: `cin` for the last resnet, `cout` for the others.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: &ParamPath,
        layers: usize,
        cin: usize,
        cout: usize,
        prev_out: usize,
        add_upsample: bool,
        opts: &BlockOpts,
        attn: Option<&AttnOpts>,
    ) -> Result<UpBlock> {
        let ins = (0..layers).map(|i| {
            let skip = if i == layers - 1 { cin } else { cout };
            let res_in = if i == 0 { prev_out } else { cout };
            res_in + skip
        });
        let resnets = load_resnets(vb, ins, cout, opts)?;
        let upsamplers = add_upsample.then(|| Upsample2D::load(&vb.pp("upsamplers").pp(0), cout)).transpose()?;
        Ok(match attn {
            Some(a) => UpBlock::CrossAttnUpBlock2D(CrossAttnUpBlock2D {
                resnets,
                attentions: load_attentions(vb, layers, cout, opts, a)?,
                upsamplers,
            }),
            None => UpBlock::UpBlock2D(UpBlock2D { resnets, upsamplers }),
        })
    }

    pub fn resnets(&self) -> &[ResnetBlock2D] {
        match self {
            UpBlock::CrossAttnUpBlock2D(b) => &b.resnets,
            UpBlock::UpBlock2D(b) => &b.resnets,
        }
    }

    pub fn attentions(&self) -> &[Transformer2DModel] {
        match self {
            UpBlock::CrossAttnUpBlock2D(b) => &b.attentions,
            UpBlock::UpBlock2D(_) => &[],
        }
    }

    fn upsamplers(&self) -> Option<&Upsample2D> {
        match self {
            UpBlock::CrossAttnUpBlock2D(b) => b.upsamplers.as_ref(),
            UpBlock::UpBlock2D(b) => b.upsamplers.as_ref(),
        }
    }

    /// x (B, C, H, W), `skips` (one per resnet, consumed from the end), temb (B, T),
    /// context (B, Lc, Cc), `upsample_size` the target of the upsampler (None: 2x).
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let resnets = self.resnets();
        if skips.len() != resnets.len() {
            return Err(Error::shape(
                "unet up block",
                format!("{} skip tensors for {} resnets", skips.len(), resnets.len()),
            ));
        }
        let attentions = self.attentions();
        let mut h = x.clone();
        for (i, (resnet, skip)) in resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = Tensor::concat(&[&h, skip], 1)?;
            h = run_resnet(resnet, &h, temb)?;
            if let Some(attn) = attentions.get(i) {
                h = run_attn(attn, &h, context)?;
            }
        }
        match self.upsamplers() {
            Some(u) => u.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
