//! Pictures for the demo's report: image grids (PNG) and line charts (SVG, no dependencies).

use crate::image_io::RgbImage;

/// Nearest-neighbour upscaling by `k` (32x32 samples are too small to look at).
pub fn upscale(img: &RgbImage, k: usize) -> RgbImage {
    let (w, h) = (img.width * k, img.height * k);
    let mut data = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let s = ((y / k) * img.width + x / k) * 3;
            data[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage { width: w, height: h, data }
}

/// Rows of images (each upscaled by `scale`) on a dark background with `gap` pixels between
/// cells and a wider gap after the columns listed in `breaks`.
pub fn compose(rows: &[Vec<RgbImage>], scale: usize, gap: usize, breaks: &[usize]) -> RgbImage {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let cell = rows.iter().flatten().next().map(|i| (i.width * scale, i.height * scale)).unwrap_or((0, 0));
    let col_x: Vec<usize> = (0..cols)
        .scan(gap, |x, c| {
            let here = *x;
            *x += cell.0 + gap + if breaks.contains(&c) { 3 * gap } else { 0 };
            Some(here)
        })
        .collect();
    let width = col_x.last().map(|x| x + cell.0 + gap).unwrap_or(gap);
    let height = rows.len() * (cell.1 + gap) + gap;
    let mut data = vec![40u8; width * height * 3];
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let big = upscale(img, scale);
            let (x0, y0) = (col_x[c], gap + r * (cell.1 + gap));
            for y in 0..big.height.min(cell.1) {
                let dst = ((y0 + y) * width + x0) * 3;
                let n = big.width.min(cell.0) * 3;
                data[dst..dst + n].copy_from_slice(&big.data[y * big.width * 3..y * big.width * 3 + n]);
            }
        }
    }
    RgbImage { width, height, data }
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// CSS colour.
    pub colour: String,
    /// Draw markers at the points (few points) instead of a bare line.
    pub markers: bool,
}

/// SVG's XML namespace name: it identifies the vocabulary to viewers and is never fetched.
const SVG_NS: &str = "http://www.w3.org/2000/svg";

const PALETTE: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];

/// A colour of a small fixed palette.
pub fn colour(i: usize) -> String {
    PALETTE[i % PALETTE.len()].to_string()
}

fn nice_ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(raw);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A line chart as a standalone SVG document (`width` x `height` px), with axes, ticks, a
/// legend and an optional horizontal reference line at `hline`.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hline: Option<f64>,
    size: (f64, f64),
) -> String {
    let (width, height) = size;
    let (ml, mr, mt, mb) = (60.0, 150.0, 30.0, 45.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some(h) = hline {
        y0 = y0.min(h);
        y1 = y1.max(h);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let (pw, ph) = (width - ml - mr, height - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let mut s = format!(
        "<svg xmlns=\"{SVG_NS}\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s += &format!(
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        ml + pw / 2.0,
        esc(title)
    );
    for t in nice_ticks(y0, y1, 6) {
        let y = sy(t);
        s += &format!("<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/>\n", ml + pw);
        s += &format!("<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n", ml - 5.0, y + 4.0, fmt_tick(t));
    }
    for t in nice_ticks(x0, x1, 8) {
        let x = sx(t);
        s += &format!("<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{mt}\" y2=\"{}\" stroke=\"#eee\"/>\n", mt + ph);
        s += &format!("<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", mt + ph + 16.0, fmt_tick(t));
    }
    s += &format!("<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>\n");
    if let Some(h) = hline {
        let y = sy(h);
        s += &format!(
            "<line x1=\"{ml}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#888\" stroke-dasharray=\"4 3\"/>\n",
            ml + pw
        );
    }
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
        ml + pw / 2.0,
        height - 8.0,
        esc(x_label)
    );
    s += &format!(
        "<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        mt + ph / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let path: Vec<String> = ser
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>\n",
            ser.colour,
            path.join(" ")
        );
        if ser.markers {
            for &(x, y) in ser.points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
                s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>\n", sx(x), sy(y), ser.colour);
            }
        }
        let ly = mt + 10.0 + i as f64 * 18.0;
        s += &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{}\" stroke-width=\"3\"/>\n",
            ml + pw + 10.0,
            ml + pw + 30.0,
            ser.colour
        );
        s += &format!("<text x=\"{}\" y=\"{}\">{}</text>\n", ml + pw + 35.0, ly + 4.0, esc(&ser.name));
    }
    s += "</svg>\n";
    s
}

fn fmt_tick(t: f64) -> String {
    if t == t.round() && t.abs() < 1e6 {
        format!("{t:.0}")
    } else {
        let s = format!("{t:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Two charts stacked in one SVG document.
pub fn stack(top: &str, bottom: &str, height_each: f64, width: f64) -> String {
    let strip = |s: &str| {
        let body = s.split_once('>').map(|x| x.1).unwrap_or(s);
        body.trim_end().trim_end_matches("</svg>").to_string()
    };
    format!(
        "<svg xmlns=\"{SVG_NS}\" width=\"{width}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<g>{}</g>\n\
         <g transform=\"translate(0 {height_each})\">{}</g>\n</svg>\n",
        2.0 * height_each,
        strip(top),
        strip(bottom)
    )
}

/// A centred moving average of width `w` (the curves are noisy per step).
pub fn smooth(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let h = w / 2;
    (0..points.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(h), (i + h + 1).min(points.len()));
            let m = points[a..b].iter().map(|p| p.1).sum::<f64>() / (b - a) as f64;
            (points[i].0, m)
        })
        .collect()
}
