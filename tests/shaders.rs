//! Every shader is parsed and validated by naga with WebGPU's capabilities, and translated to
//! SPIR-V, MSL and HLSL, so a kernel that would fail on Vulkan, Metal or DX12 fails here first,
//! without a device. Also checks the limits wgpu does not check itself.

use std::collections::BTreeSet;

use naga::valid::{Capabilities, ValidationFlags, Validator};

/// WebGPU's default limits, which portable kernels must respect.
const MAX_WORKGROUP_STORAGE: u32 = 16 * 1024;
const MAX_INVOCATIONS: u32 = 256;

fn check(name: &str, source: &str, caps: Capabilities) -> Vec<String> {
    let mut errs = Vec::new();
    let module = match naga::front::wgsl::parse_str(source) {
        Ok(m) => m,
        Err(e) => return vec![format!("{name}: parse: {}", e.emit_to_string(source))],
    };
    let info = match Validator::new(ValidationFlags::all(), caps).validate(&module) {
        Ok(i) => i,
        Err(e) => return vec![format!("{name}: validate: {}", e.emit_to_string(source))],
    };
    if module.entry_points.is_empty() {
        errs.push(format!("{name}: no entry point"));
    }
    let wg_bytes: u32 = module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
        .sum();
    if wg_bytes > MAX_WORKGROUP_STORAGE {
        errs.push(format!("{name}: {wg_bytes} bytes of workgroup storage > {MAX_WORKGROUP_STORAGE}"));
    }
    for ep in &module.entry_points {
        let n: u32 = ep.workgroup_size.iter().product();
        if n > MAX_INVOCATIONS {
            errs.push(format!("{name}::{}: {n} invocations per workgroup > {MAX_INVOCATIONS}", ep.name));
        }
    }
    if let Err(e) = naga::back::spv::write_vec(&module, &info, &naga::back::spv::Options::default(), None) {
        errs.push(format!("{name}: SPIR-V: {e}"));
    }
    if let Err(e) = naga::back::msl::write_string(
        &module,
        &info,
        &naga::back::msl::Options::default(),
        &naga::back::msl::PipelineOptions::default(),
    ) {
        errs.push(format!("{name}: MSL: {e}"));
    }
    let mut hlsl = String::new();
    let opts = naga::back::hlsl::Options::default();
    let popts = naga::back::hlsl::PipelineOptions::default();
    if let Err(e) = naga::back::hlsl::Writer::new(&mut hlsl, &opts, &popts).write(&module, &info, None) {
        errs.push(format!("{name}: HLSL: {e}"));
    }
    errs
}

/// The optional capabilities a kernel variant is built for.
fn needs(s: &vipo::device::Shader) -> Capabilities {
    let mut caps = Capabilities::empty();
    if s.fragment == vipo::device::SUBGROUP_FRAGMENT {
        caps |= Capabilities::SUBGROUP;
    }
    if s.source.starts_with("enable f16;") {
        caps |= Capabilities::SHADER_FLOAT16;
    }
    caps
}

#[test]
fn all_shaders_validate_and_translate() {
    let mut errs = Vec::new();
    for s in vipo::shaders::all() {
        // A subgroup variant needs the adapter's subgroups and an f16 variant its SHADER_F16
        // (each is picked only then); every other kernel must validate with neither.
        errs.extend(check(s.name, s.source, needs(s)));
    }
    // Those variants are the only kernels that need the capabilities.
    for s in vipo::shaders::all().iter().filter(|s| !needs(s).is_empty()) {
        assert!(
            !check(s.name, s.source, Capabilities::empty()).is_empty(),
            "{} validates without {:?}",
            s.name,
            needs(s)
        );
    }
    assert!(errs.is_empty(), "shader problems:\n{}", errs.join("\n"));
}

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("shaders/ exists")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".wgsl")).map(String::from))
        .collect();
    let mut registered: BTreeSet<String> = vipo::shaders::all().iter().map(|s| s.file.to_string()).collect();
    registered.extend(vipo::shaders::all().iter().filter(|s| !s.fragment.is_empty()).map(|s| s.fragment.to_string()));
    assert_eq!(files, registered, "shaders/ and vipo::shaders::all() disagree");
    // The registered source is the file on disk (include_str! of the same path), behind its
    // fragment's file if it has one, or a prelude of `const`s for a tiled variant.
    let read = |f: &str| std::fs::read_to_string(dir.join(format!("{f}.wgsl"))).expect("readable");
    for s in vipo::shaders::all() {
        let disk = read(s.file);
        let before =
            s.source.strip_suffix(disk.as_str()).unwrap_or_else(|| panic!("{} is not {}.wgsl", s.name, s.file));
        if s.fragment.is_empty() {
            let prelude_line = |l: &str| ["const ", "alias ", "enable f16;"].iter().any(|p| l.starts_with(p));
            assert!(before.lines().all(prelude_line), "{}: prelude {before:?}", s.name);
            assert_eq!(before.is_empty(), s.name == s.file, "{}: only variants have a prelude", s.name);
        } else {
            assert_eq!(before, read(s.fragment), "{}: not {}.wgsl before {}.wgsl", s.name, s.fragment, s.file);
        }
    }
    let names: BTreeSet<&str> = vipo::shaders::all().iter().map(|s| s.name).collect();
    assert_eq!(names.len(), vipo::shaders::all().len(), "two shaders share a module-cache name");
}

#[test]
fn validator_rejects_a_broken_shader() {
    // The check above must be able to fail: an undefined name and an oversized workgroup array.
    let bad = "@compute @workgroup_size(64) fn main() { x = 1.0; }";
    assert!(!check("bad", bad, Capabilities::empty()).is_empty());
    let big = "var<workgroup> t: array<f32, 8192>;\n@compute @workgroup_size(512) fn main() { t[0] = 1.0; }";
    let errs = check("big", big, Capabilities::empty());
    assert!(errs.iter().any(|e| e.contains("workgroup storage")), "{errs:?}");
    assert!(errs.iter().any(|e| e.contains("invocations")), "{errs:?}");
}

#[test]
fn params_mirrors_match_the_shader_structs() {
    use std::mem::size_of;
    use vipo::ops::*;
    // Each shader's `Params` against its `#[repr(C)]` Rust mirror: a missing field or a
    // wrong padding shows up as a size difference, and the GPU would read shifted values.
    let mirrors: &[(&str, usize)] = &[
        ("unary", size_of::<unary::UnaryParams>()),
        ("binary", size_of::<binary::BinaryParams>()),
        ("where", size_of::<binary::WhereParams>()),
        ("reduce", size_of::<reduce::ReduceParams>()),
        ("softmax", size_of::<softmax::SoftmaxParams>()),
        ("norm", size_of::<norm::NormParams>()),
        ("matmul", size_of::<matmul::MatmulParams>()),
        ("conv2d", size_of::<conv2d::Conv2dParams>()),
        ("conv2d_fwd", size_of::<conv2d::Conv2dParams>()),
        ("conv2d_split", size_of::<conv2d::SplitParams>()),
        ("upsample", size_of::<upsample::UpsampleParams>()),
        ("copy", size_of::<copy::CopyParams>()),
        ("timestep", size_of::<timestep::TimestepParams>()),
        ("attention", size_of::<attention::AttentionParams>()),
        ("geglu", size_of::<geglu::GegluParams>()),
        ("adamw", size_of::<vipo::optim::AdamWParams>()),
        ("train_step", size_of::<train_step::StepParams>()),
        ("cast", size_of::<cast::CastParams>()),
    ];
    let covered: BTreeSet<&str> = mirrors.iter().map(|m| m.0).collect();
    let all: BTreeSet<&str> = vipo::shaders::all().iter().map(|s| s.file).collect();
    // (Fragments define no Params of their own: they are checked inside their kernels.)
    assert_eq!(covered, all, "every shader file needs its Params mirror listed here");
    for s in vipo::shaders::all() {
        let module = naga::front::wgsl::parse_str(s.source).expect("parses (checked above)");
        let (_, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some("Params"))
            .unwrap_or_else(|| panic!("{}: no Params struct", s.name));
        let wgsl = ty.inner.size(module.to_ctx()) as usize;
        let rust = mirrors.iter().find(|m| m.0 == s.file).map(|m| m.1).unwrap_or_default();
        assert_eq!(wgsl, rust, "{}: WGSL Params is {wgsl} bytes, the Rust mirror {rust}", s.name);
        assert_eq!(rust % 16, 0, "{}: uniform structs are padded to 16 bytes", s.name);
    }
}
