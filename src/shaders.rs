//! Every WGSL kernel the runtime dispatches, for the pipeline cache and for the offline
//! naga validation test (which also checks that no file in `shaders/` is left out).

use crate::device::Shader;

macro_rules! shader {
    ($ident:ident, $name:literal) => {
        pub static $ident: Shader =
            Shader { name: $name, source: include_str!(concat!("../shaders/", $name, ".wgsl")) };
    };
}

shader!(UNARY, "unary");
shader!(BINARY, "binary");
shader!(WHERE, "where");
shader!(REDUCE, "reduce");
shader!(SOFTMAX, "softmax");
shader!(NORM, "norm");
shader!(MATMUL, "matmul");
shader!(CONV2D, "conv2d");
shader!(UPSAMPLE, "upsample");
shader!(COPY, "copy");
shader!(TIMESTEP, "timestep");
shader!(ATTENTION, "attention");
shader!(GEGLU, "geglu");
shader!(ADAMW, "adamw");
shader!(CAST, "cast");

/// All shaders, in no particular order.
pub fn all() -> [&'static Shader; 15] {
    [
        &UNARY, &BINARY, &WHERE, &REDUCE, &SOFTMAX, &NORM, &MATMUL, &CONV2D, &UPSAMPLE, &COPY, &TIMESTEP, &ATTENTION,
        &GEGLU, &ADAMW, &CAST,
    ]
}
