//! Loaders and building blocks of the diffusion models vipo trains (diffusers layouts).

pub mod autoencoder_kl;
pub mod clip_text;
pub mod clip_tokenizer;
pub mod ldm_convert;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

/// A folder shipped under `models/<name>`, recognised by the file `probe` inside it: looked up
/// under the working directory, next to the executable and in each folder above it (an install
/// prefix, or the checkout above `target/release`), then in the source checkout this was built
/// from. The error lists every place tried and says what to do instead (`hint`).
pub fn shipped_dir(name: &str, probe: &str, what: &str, hint: &str) -> crate::error::Result<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let mut tried = vec![PathBuf::from("models").join(name)];
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        tried.extend(exe_dir.ancestors().map(|a| a.join("models").join(name)));
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(name));
    if let Some(found) = tried.iter().find(|d| d.join(probe).is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = tried.iter().map(|d| format!("  {}", d.display())).collect();
    Err(crate::error::Error::Invalid(format!(
        "models/{name} ({what}) not found; looked in:\n{}\n{hint}",
        list.join("\n")
    )))
}
