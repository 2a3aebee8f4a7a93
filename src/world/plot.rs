//! Pictures for the demo's report: image grids and line charts, both written as PNG (the
//! charts' text in the `font8x8` bitmap font).

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

/// An RGB colour.
pub type Rgb = [u8; 3];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub colour: Rgb,
    /// Draw markers at the points (few points) instead of a bare line.
    pub markers: bool,
}

const PALETTE: [Rgb; 6] = [
    [0x1f, 0x77, 0xb4],
    [0xd6, 0x27, 0x28],
    [0x2c, 0xa0, 0x2c],
    [0xff, 0x7f, 0x0e],
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
];
/// Raw per-step values behind a smoothed line.
pub const LIGHT_GREY: Rgb = [0xbb, 0xbb, 0xbb];
const WHITE: Rgb = [255, 255, 255];
const GRID: Rgb = [0xee, 0xee, 0xee];
const FRAME: Rgb = [0x33, 0x33, 0x33];
const REFERENCE: Rgb = [0x88, 0x88, 0x88];
const INK: Rgb = [0x11, 0x11, 0x11];
/// Glyph cell of the 8x8 bitmap font.
const GLYPH: i64 = 8;

/// A colour of a small fixed palette.
pub fn colour(i: usize) -> Rgb {
    PALETTE[i % PALETTE.len()]
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

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb) {
    if x >= 0 && y >= 0 && (x as usize) < img.width && (y as usize) < img.height {
        let i = (y as usize * img.width + x as usize) * 3;
        img.data[i..i + 3].copy_from_slice(&c);
    }
}

/// A filled `size` x `size` square with its top-left corner at (x, y).
fn square(img: &mut RgbImage, x: i64, y: i64, size: i64, c: Rgb) {
    for dy in 0..size {
        for dx in 0..size {
            put(img, x + dx, y + dy, c);
        }
    }
}

/// A straight line `width` pixels thick (Bresenham, a square brush).
fn line(img: &mut RgbImage, from: (f64, f64), to: (f64, f64), width: i64, c: Rgb) {
    let (mut x, mut y) = (from.0.round() as i64, from.1.round() as i64);
    let (x1, y1) = (to.0.round() as i64, to.1.round() as i64);
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    let off = (width - 1) / 2;
    loop {
        square(img, x - off, y - off, width, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// The 8x8 glyph of `ch` (printable ASCII; anything else draws as '?'): row r, bit b set =
/// pixel (b, r) inked.
fn glyph(ch: char) -> [u8; 8] {
    let i = if ch.is_ascii_graphic() || ch == ' ' { ch as usize } else { '?' as usize };
    font8x8::legacy::BASIC_LEGACY[i]
}

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * GLYPH
}

/// Text with its top-left corner at (x, y).
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb) {
    for (k, ch) in s.chars().enumerate() {
        for (r, bits) in glyph(ch).iter().enumerate() {
            for b in 0..8 {
                if bits & (1 << b) != 0 {
                    put(img, x + k as i64 * GLYPH + b, y + r as i64, c);
                }
            }
        }
    }
}

/// Text turned a quarter left (read from bottom to top), its baseline's start at (x, y).
fn text_up(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb) {
    for (k, ch) in s.chars().enumerate() {
        for (r, bits) in glyph(ch).iter().enumerate() {
            for b in 0..8 {
                if bits & (1 << b) != 0 {
                    put(img, x + r as i64, y - k as i64 * GLYPH - b, c);
                }
            }
        }
    }
}

/// A line chart as a `size` (width, height) picture with axes, ticks, a legend and an
/// optional dashed horizontal reference line at `hline`. Non-finite points are left out.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    hline: Option<f64>,
    size: (usize, usize),
) -> RgbImage {
    let (width, height) = size;
    let mut img = RgbImage { width, height, data: WHITE.repeat(width * height) };
    let (ml, mr, mt, mb) = (76.0, 170.0, 30.0, 45.0);
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in series.iter().flat_map(|s| s.points.iter()).filter(finite) {
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
    let (pw, ph) = (width as f64 - ml - mr, height as f64 - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let (left, right, top, bottom) = (ml as i64, (ml + pw) as i64, mt as i64, (mt + ph) as i64);

    text(&mut img, (ml + pw / 2.0) as i64 - text_width(title) / 2, 10, title, INK);
    for t in nice_ticks(y0, y1, 6) {
        let y = sy(t);
        line(&mut img, (ml, y), (ml + pw, y), 1, GRID);
        let label = fmt_tick(t);
        text(&mut img, left - 6 - text_width(&label), y as i64 - GLYPH / 2, &label, INK);
    }
    for t in nice_ticks(x0, x1, 8) {
        let x = sx(t);
        line(&mut img, (x, mt), (x, mt + ph), 1, GRID);
        let label = fmt_tick(t);
        text(&mut img, x as i64 - text_width(&label) / 2, bottom + 8, &label, INK);
    }
    let corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)];
    for c in corners.windows(2) {
        line(&mut img, (c[0].0 as f64, c[0].1 as f64), (c[1].0 as f64, c[1].1 as f64), 1, FRAME);
    }
    if let Some(h) = hline {
        let y = sy(h);
        let mut x = left;
        while x < right {
            line(&mut img, (x as f64, y), (((x + 5).min(right)) as f64, y), 1, REFERENCE);
            x += 9;
        }
    }
    text(&mut img, (ml + pw / 2.0) as i64 - text_width(x_label) / 2, height as i64 - 14, x_label, INK);
    text_up(&mut img, 8, (mt + ph / 2.0) as i64 + text_width(y_label) / 2, y_label, INK);
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = ser.points.iter().filter(finite).map(|&(x, y)| (sx(x), sy(y))).collect();
        for pair in pts.windows(2) {
            line(&mut img, pair[0], pair[1], 2, ser.colour);
        }
        if ser.markers || pts.len() == 1 {
            for &(x, y) in &pts {
                square(&mut img, x.round() as i64 - 3, y.round() as i64 - 3, 7, ser.colour);
            }
        }
        let ly = top + 10 + i as i64 * 18;
        line(&mut img, ((right + 10) as f64, ly as f64), ((right + 30) as f64, ly as f64), 3, ser.colour);
        text(&mut img, right + 36, ly - GLYPH / 2, &ser.name, INK);
    }
    img
}

fn fmt_tick(t: f64) -> String {
    if t == t.round() && t.abs() < 1e6 {
        format!("{t:.0}")
    } else {
        let s = format!("{t:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
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
