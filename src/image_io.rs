//! Images in and out: PNG files other tools open, with the generation parameters in a
//! `parameters` tEXt chunk (the key A1111-style tools read), written atomically.

use std::io::BufWriter;
use std::path::Path;

use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// (height, width, 3) bytes.
    pub data: Vec<u8>,
}

/// Decoder output (B, 3, H, W) in [-1, 1] to images: `(x / 2 + 0.5).clamp(0, 1)`, then
/// `(x * 255).round()`, as diffusers' image processor and `numpy_to_pil` do.
pub fn images_from_decoded(x: &Tensor) -> Result<Vec<RgbImage>> {
    let s = x.shape();
    if s.len() != 4 || s[1] != 3 {
        return Err(Error::shape("images_from_decoded", format!("expected (B, 3, H, W), got {s:?}")));
    }
    let (b, h, w) = (s[0], s[2], s[3]);
    let v = x.to_vec()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let mut data = vec![0u8; h * w * 3];
        for c in 0..3 {
            for p in 0..h * w {
                let val = (v[((i * 3 + c) * h * w) + p] / 2.0 + 0.5).clamp(0.0, 1.0);
                data[p * 3 + c] = (val * 255.0).round() as u8;
            }
        }
        out.push(RgbImage { width: w, height: h, data });
    }
    Ok(out)
}

/// Writes `img` as PNG with optional `parameters` text, via a temp file and a rename.
pub fn write_png(path: &Path, img: &RgbImage, parameters: Option<&str>) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    let result = (|| -> std::result::Result<(), String> {
        let file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut enc = png::Encoder::new(BufWriter::new(file), img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(p) = parameters {
            enc.add_text_chunk("parameters".to_string(), p.to_string()).map_err(|e| e.to_string())?;
        }
        let mut w = enc.write_header().map_err(|e| e.to_string())?;
        w.write_image_data(&img.data).map_err(|e| e.to_string())?;
        w.finish().map_err(|e| e.to_string())?;
        Ok(())
    })();
    if let Err(msg) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::File { path: path.to_path_buf(), msg: format!("writing PNG: {msg}") });
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads a PNG as RGB (8-bit RGB or RGBA; alpha dropped) and its `parameters` text if any.
pub fn read_png(path: &Path) -> Result<(RgbImage, Option<String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::File { path: path.to_path_buf(), msg };
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or_else(|| bad("image too large".into()))?];
    let info = reader.next_frame(&mut buf).map_err(|e| bad(format!("corrupt PNG data: {e}")))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        other => return Err(bad(format!("unsupported PNG color type {other:?}"))),
    };
    if info.bit_depth != png::BitDepth::Eight {
        return Err(bad(format!("unsupported PNG bit depth {:?} (8-bit only)", info.bit_depth)));
    }
    let mut data = Vec::with_capacity(w * h * 3);
    for px in buf[..w * h * channels].chunks(channels) {
        match channels {
            1 | 2 => data.extend([px[0]; 3]),
            _ => data.extend(&px[..3]),
        }
    }
    let params =
        reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone());
    Ok((RgbImage { width: w, height: h, data }, params))
}
