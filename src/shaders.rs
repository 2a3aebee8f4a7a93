//! Every WGSL kernel the runtime dispatches, for the pipeline cache and for the offline
//! naga validation test (which also checks that no file in `shaders/` is left out).

use crate::device::Shader;

macro_rules! shader {
    ($ident:ident, $name:literal) => {
        pub static $ident: Shader = Shader {
            name: $name,
            file: $name,
            fragment: "",
            source: include_str!(concat!("../shaders/", $name, ".wgsl")),
        };
    };
}

/// A kernel built on a fragment of `shaders/` (put before the kernel's file): `$fragment`
/// defines what the kernel leaves open, e.g. the workgroup reductions, with or without
/// subgroup operations.
macro_rules! on_fragment {
    ($ident:ident, $name:literal, $file:literal, $fragment:literal) => {
        pub static $ident: Shader = Shader {
            name: $name,
            file: $file,
            fragment: $fragment,
            source: concat!(
                include_str!(concat!("../shaders/", $fragment, ".wgsl")),
                include_str!(concat!("../shaders/", $file, ".wgsl"))
            ),
        };
    };
}

shader!(UNARY, "unary");
shader!(BINARY, "binary");
shader!(WHERE, "where");
// Kernels with workgroup reductions: on the tree, and on subgroup operations where the adapter
// has them (`GpuContext::subgroups`).
on_fragment!(REDUCE, "reduce", "reduce", "reduce_tree");
on_fragment!(REDUCE_SUBGROUP, "reduce_on_subgroups", "reduce", "reduce_subgroup");
on_fragment!(SOFTMAX, "softmax", "softmax", "reduce_tree");
on_fragment!(SOFTMAX_SUBGROUP, "softmax_subgroup", "softmax", "reduce_subgroup");
on_fragment!(NORM, "norm", "norm", "reduce_tree");
on_fragment!(NORM_SUBGROUP, "norm_subgroup", "norm", "reduce_subgroup");

/// A tiled kernel's variant: `$prelude` (the tile's `const`s, an element type `alias`, and
/// `enable f16;` where that type is f16) goes before the file's source.
macro_rules! tiled {
    ($ident:ident, $name:literal, $file:literal, $prelude:literal) => {
        pub static $ident: Shader = Shader {
            name: $name,
            file: $file,
            fragment: "",
            source: concat!($prelude, include_str!(concat!("../shaders/", $file, ".wgsl"))),
        };
    };
}

// Matmul tiles (BM x BN outputs per workgroup, BK deep); `ops::matmul::tile` picks one. The
// f16 variants read f16 operands (adapters with SHADER_F16) and compute in f32; the f16b ones
// read an f32 A and an f16 B (a weight stored in f16).
tiled!(
    MATMUL_64,
    "matmul_64x64",
    "matmul",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    MATMUL_128X64,
    "matmul_128x64",
    "matmul",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_64X128,
    "matmul_64x128",
    "matmul",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_128,
    "matmul_128x128",
    "matmul",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16_64,
    "matmul_f16_64x64",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    MATMUL_F16_128X64,
    "matmul_f16_128x64",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16_64X128,
    "matmul_f16_64x128",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16_128,
    "matmul_f16_128x128",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16B_64,
    "matmul_f16b_64x64",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    MATMUL_F16B_128X64,
    "matmul_f16b_128x64",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16B_64X128,
    "matmul_f16b_64x128",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16B_128,
    "matmul_f16b_128x128",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
// f16 arithmetic (opt-in, `GpuContext::f16_math`): f16 tiles, each K step's products summed in
// f16, f32 across steps; f16m: both operands f16, f16bm: an f32 A (rounded to f16) and an f16 B.
tiled!(
    MATMUL_F16M_64,
    "matmul_f16m_64x64",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    MATMUL_F16M_128X64,
    "matmul_f16m_128x64",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16M_64X128,
    "matmul_f16m_64x128",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16M_128,
    "matmul_f16m_128x128",
    "matmul",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16BM_64,
    "matmul_f16bm_64x64",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    MATMUL_F16BM_128X64,
    "matmul_f16bm_128x64",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16BM_64X128,
    "matmul_f16bm_64x128",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    MATMUL_F16BM_128,
    "matmul_f16bm_128x128",
    "matmul",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
// The convolution forward on the same tiles.
tiled!(
    CONV2D_FWD_64,
    "conv2d_fwd_64x64",
    "conv2d_fwd",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    CONV2D_FWD_128X64,
    "conv2d_fwd_128x64",
    "conv2d_fwd",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_64X128,
    "conv2d_fwd_64x128",
    "conv2d_fwd",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_128,
    "conv2d_fwd_128x128",
    "conv2d_fwd",
    "alias ELA = f32;\nalias ELB = f32;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16_64,
    "conv2d_fwd_f16_64x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    CONV2D_FWD_F16_128X64,
    "conv2d_fwd_f16_128x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16_64X128,
    "conv2d_fwd_f16_64x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16_128,
    "conv2d_fwd_f16_128x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16W_64,
    "conv2d_fwd_f16w_64x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    CONV2D_FWD_F16W_128X64,
    "conv2d_fwd_f16w_128x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16W_64X128,
    "conv2d_fwd_f16w_64x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16W_128,
    "conv2d_fwd_f16w_128x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f32;\nconst F16_MATH: bool = false;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
// f16 arithmetic for convolutions (opt-in, `GpuContext::f16_math`): f16m both operands f16,
// f16wm an f32 input (or dY) rounded to f16 and an f16 weight.
tiled!(
    CONV2D_FWD_F16M_64,
    "conv2d_fwd_f16m_64x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    CONV2D_FWD_F16M_128X64,
    "conv2d_fwd_f16m_128x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16M_64X128,
    "conv2d_fwd_f16m_64x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16M_128,
    "conv2d_fwd_f16m_128x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f16;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16WM_64,
    "conv2d_fwd_f16wm_64x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 64u;\nconst BK: u32 = 16u;\n"
);
tiled!(
    CONV2D_FWD_F16WM_128X64,
    "conv2d_fwd_f16wm_128x64",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 64u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16WM_64X128,
    "conv2d_fwd_f16wm_64x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 64u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
tiled!(
    CONV2D_FWD_F16WM_128,
    "conv2d_fwd_f16wm_128x128",
    "conv2d_fwd",
    "enable f16;\nalias ELA = f32;\nalias ELB = f16;\nalias ELM = f16;\nconst F16_MATH: bool = true;\nconst BM: u32 = 128u;\nconst BN: u32 = 128u;\nconst BK: u32 = 8u;\n"
);
shader!(CONV2D, "conv2d");
shader!(CONV2D_SPLIT, "conv2d_split");
shader!(UPSAMPLE, "upsample");
shader!(COPY, "copy");
shader!(TIMESTEP, "timestep");
// Fused attention: any head dim up to 160, and head dims fixed at compile time (D == Dv).
tiled!(ATTENTION, "attention_generic", "attention", "const MAX_D: u32 = 160u;\nconst FIXED_D: u32 = 0u;\n");
tiled!(ATTENTION_D40, "attention_d40", "attention", "const MAX_D: u32 = 40u;\nconst FIXED_D: u32 = 40u;\n");
tiled!(ATTENTION_D64, "attention_d64", "attention", "const MAX_D: u32 = 64u;\nconst FIXED_D: u32 = 64u;\n");
tiled!(ATTENTION_D80, "attention_d80", "attention", "const MAX_D: u32 = 80u;\nconst FIXED_D: u32 = 80u;\n");
shader!(GEGLU, "geglu");
shader!(ADAMW, "adamw");
// A training step's loss head, gradient norm and guard (one workgroup's sums: on the tree).
on_fragment!(TRAIN_STEP, "train_step", "train_step", "reduce_tree");
shader!(CAST, "cast");

/// All shaders, in no particular order.
pub fn all() -> [&'static Shader; 62] {
    [
        &UNARY,
        &BINARY,
        &WHERE,
        &REDUCE,
        &REDUCE_SUBGROUP,
        &SOFTMAX,
        &SOFTMAX_SUBGROUP,
        &NORM,
        &NORM_SUBGROUP,
        &MATMUL_64,
        &MATMUL_128X64,
        &MATMUL_64X128,
        &MATMUL_128,
        &MATMUL_F16_64,
        &MATMUL_F16_128X64,
        &MATMUL_F16_64X128,
        &MATMUL_F16_128,
        &MATMUL_F16B_64,
        &MATMUL_F16B_128X64,
        &MATMUL_F16B_64X128,
        &MATMUL_F16B_128,
        &MATMUL_F16M_64,
        &MATMUL_F16M_128X64,
        &MATMUL_F16M_64X128,
        &MATMUL_F16M_128,
        &MATMUL_F16BM_64,
        &MATMUL_F16BM_128X64,
        &MATMUL_F16BM_64X128,
        &MATMUL_F16BM_128,
        &CONV2D,
        &CONV2D_SPLIT,
        &CONV2D_FWD_64,
        &CONV2D_FWD_128X64,
        &CONV2D_FWD_64X128,
        &CONV2D_FWD_128,
        &CONV2D_FWD_F16_64,
        &CONV2D_FWD_F16_128X64,
        &CONV2D_FWD_F16_64X128,
        &CONV2D_FWD_F16_128,
        &CONV2D_FWD_F16W_64,
        &CONV2D_FWD_F16W_128X64,
        &CONV2D_FWD_F16W_64X128,
        &CONV2D_FWD_F16W_128,
        &CONV2D_FWD_F16M_64,
        &CONV2D_FWD_F16M_128X64,
        &CONV2D_FWD_F16M_64X128,
        &CONV2D_FWD_F16M_128,
        &CONV2D_FWD_F16WM_64,
        &CONV2D_FWD_F16WM_128X64,
        &CONV2D_FWD_F16WM_64X128,
        &CONV2D_FWD_F16WM_128,
        &UPSAMPLE,
        &COPY,
        &TIMESTEP,
        &ATTENTION,
        &ATTENTION_D40,
        &ATTENTION_D64,
        &ATTENTION_D80,
        &GEGLU,
        &ADAMW,
        &TRAIN_STEP,
        &CAST,
    ]
}

/// The variant of a kernel with workgroup reductions for `ctx`: on subgroup operations where
/// it has them (`GpuContext::subgroups`), else on the tree.
pub fn with_reductions(
    ctx: &crate::device::GpuContext,
    tree: &'static Shader,
    subgroup: &'static Shader,
) -> &'static Shader {
    if ctx.subgroups() {
        subgroup
    } else {
        tree
    }
}
