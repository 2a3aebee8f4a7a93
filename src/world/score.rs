//! Scorers a program can check, in the spirit of GenEval: every pixel is labelled with the
//! nearest of the background and the four colours, same-label 4-connected components are the
//! objects, and each scorer reads one property of them. The "aesthetic" scorer disagrees with
//! the others on purpose: it likes one big, centred blob, whatever the prompt asked for.

use super::render::BACKGROUND;
use super::{Colour, Prompt, Shape, COLOURS, SIZE};
use crate::image_io::RgbImage;

/// Components smaller than this are specks, not objects.
pub const MIN_AREA: usize = 3;
/// A pixel farther than this (RGB distance) from every colour is "other" foreground.
const MAX_COLOUR_DIST: f32 = 110.0;

/// The scorers, in report order. `position` applies only to prompts that name a place.
pub const SCORERS: [&str; 5] = ["count", "colour", "shape", "position", "aesthetic"];
/// The scorers that measure whether the image follows the prompt (the demo's "score").
pub const TASK_SCORERS: [&str; 4] = ["count", "colour", "shape", "position"];

/// One object found in an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// None: a colour far from all four.
    pub colour: Option<Colour>,
    pub area: usize,
    /// Centroid (x, y) in pixels.
    pub centroid: (f32, f32),
    /// Bounding box [x0, y0, x1, y1] inclusive.
    pub bbox: [usize; 4],
    /// None when the blob is not recognisably one of the three shapes.
    pub shape: Option<Shape>,
}

/// What the scorers see in an image.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub objects: Vec<Object>,
    /// Pixels that are not background (specks included).
    pub foreground: usize,
    /// Centroid of all foreground pixels.
    pub fg_centroid: (f32, f32),
}

/// Scores of one image for one prompt, each in [0, 1]; `position` is None when the prompt
/// names no place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub count: f64,
    pub colour: f64,
    pub shape: f64,
    pub position: Option<f64>,
    pub aesthetic: f64,
}

impl Scores {
    /// By scorer name; None for a scorer that does not apply.
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "count" => Some(self.count),
            "colour" => Some(self.colour),
            "shape" => Some(self.shape),
            "position" => self.position,
            "aesthetic" => Some(self.aesthetic),
            _ => None,
        }
    }
    /// The task score: the mean of the applicable task scorers.
    pub fn task(&self) -> f64 {
        let v: Vec<f64> = TASK_SCORERS.iter().filter_map(|s| self.get(s)).collect();
        v.iter().sum::<f64>() / v.len() as f64
    }
    /// GenEval's strict verdict: every applicable task scorer gives full marks.
    pub fn all_correct(&self) -> bool {
        TASK_SCORERS.iter().filter_map(|s| self.get(s)).all(|v| v >= 1.0 - 1e-9)
    }
}

fn dist2(a: [u8; 3], b: [u8; 3]) -> f32 {
    (0..3).map(|i| (a[i] as f32 - b[i] as f32).powi(2)).sum()
}

/// Pixel labels: 0 background, 1..=4 a colour of [`COLOURS`], 5 other.
fn labels(img: &RgbImage) -> Vec<u8> {
    img.data
        .chunks_exact(3)
        .map(|p| {
            let p = [p[0], p[1], p[2]];
            let mut best = (dist2(p, BACKGROUND), 0u8);
            for (i, c) in COLOURS.iter().enumerate() {
                let d = dist2(p, c.rgb());
                if d < best.0 {
                    best = (d, i as u8 + 1);
                }
            }
            if best.1 != 0 && best.0 > MAX_COLOUR_DIST * MAX_COLOUR_DIST {
                5
            } else {
                best.1
            }
        })
        .collect()
}

/// Is normalised position (u, v) in [0, 1]^2 inside `shape` drawn to fill its box?
fn template(shape: Shape, u: f32, v: f32) -> bool {
    match shape {
        Shape::Square => true,
        Shape::Circle => (u - 0.5).powi(2) + (v - 0.5).powi(2) <= 0.25,
        Shape::Triangle => (u - 0.5).abs() <= v / 2.0 + 0.02,
    }
}

/// Intersection over union below which a blob is none of the shapes.
pub const MIN_SHAPE_IOU: f32 = 0.7;

/// The shape whose template, stretched over the blob's bounding box, overlaps the blob best
/// (intersection over union, at least [`MIN_SHAPE_IOU`]); None for slivers and shapeless blobs.
/// Ground truth matches its own template exactly or nearly (pixel-centre rasterisation), and
/// the three templates are far apart (a disc covers 79% of its box, a triangle 50%).
fn classify(mask: &dyn Fn(usize, usize) -> bool, bbox: [usize; 4]) -> Option<Shape> {
    let [x0, y0, x1, y1] = bbox;
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    if w < 3 || h < 3 || w * 2 < h || h * 2 < w {
        return None;
    }
    let mut best = (0.0f32, None);
    for shape in [Shape::Square, Shape::Circle, Shape::Triangle] {
        let (mut inter, mut union) = (0usize, 0usize);
        for y in y0..=y1 {
            for x in x0..=x1 {
                let u = (x - x0) as f32 / w as f32 + 0.5 / w as f32;
                let v = (y - y0) as f32 / h as f32 + 0.5 / h as f32;
                let (a, b) = (mask(x, y), template(shape, u, v));
                inter += (a && b) as usize;
                union += (a || b) as usize;
            }
        }
        let iou = inter as f32 / union.max(1) as f32;
        if iou > best.0 {
            best = (iou, Some(shape));
        }
    }
    if best.0 >= MIN_SHAPE_IOU {
        best.1
    } else {
        None
    }
}

/// Finds the objects of an image.
pub fn analyse(img: &RgbImage) -> Analysis {
    let (w, h) = (img.width, img.height);
    let lab = labels(img);
    let mut seen = vec![false; w * h];
    let mut objects = Vec::new();
    let (mut fg, mut sx, mut sy) = (0usize, 0f64, 0f64);
    for (i, &l) in lab.iter().enumerate() {
        if l != 0 {
            fg += 1;
            sx += (i % w) as f64 + 0.5;
            sy += (i / w) as f64 + 0.5;
        }
    }
    let mut stack = Vec::new();
    let mut members = Vec::new();
    for start in 0..w * h {
        if lab[start] == 0 || seen[start] {
            continue;
        }
        let l = lab[start];
        members.clear();
        stack.push(start);
        seen[start] = true;
        while let Some(i) = stack.pop() {
            members.push(i);
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if !seen[j] && lab[j] == l {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if members.len() < MIN_AREA {
            continue;
        }
        let mut bbox = [usize::MAX, usize::MAX, 0, 0];
        let (mut cx, mut cy) = (0f32, 0f32);
        for &i in &members {
            let (x, y) = (i % w, i / w);
            bbox = [bbox[0].min(x), bbox[1].min(y), bbox[2].max(x), bbox[3].max(y)];
            cx += x as f32 + 0.5;
            cy += y as f32 + 0.5;
        }
        let n = members.len() as f32;
        let set: std::collections::HashSet<usize> = members.iter().copied().collect();
        let in_obj = |x: usize, y: usize| set.contains(&(y * w + x));
        let shape = classify(&in_obj, bbox);
        let colour = if l == 5 { None } else { Some(COLOURS[l as usize - 1]) };
        objects.push(Object { colour, area: members.len(), centroid: (cx / n, cy / n), bbox, shape });
    }
    let fg_centroid = if fg > 0 { ((sx / fg as f64) as f32, (sy / fg as f64) as f32) } else { (0.0, 0.0) };
    Analysis { objects, foreground: fg, fg_centroid }
}

/// Scores an analysed image against a prompt.
pub fn score_analysis(a: &Analysis, prompt: &Prompt) -> Scores {
    let n = a.objects.len();
    let want = prompt.count as usize;
    let count = 1.0 / (1.0 + n.abs_diff(want) as f64);
    let total_area: usize = a.objects.iter().map(|o| o.area).sum();
    let colour = if total_area == 0 {
        0.0
    } else {
        a.objects.iter().filter(|o| o.colour == Some(prompt.colour)).map(|o| o.area).sum::<usize>() as f64
            / total_area as f64
    };
    let frac = |f: &dyn Fn(&Object) -> bool| {
        if n == 0 {
            0.0
        } else {
            a.objects.iter().filter(|o| f(o)).count() as f64 / n as f64
        }
    };
    let shape = frac(&|o: &Object| o.shape == Some(prompt.shape));
    let position = prompt.position.map(|p| {
        let [x0, y0, x1, y1] = p.region();
        frac(&|o: &Object| {
            let (x, y) = o.centroid;
            x >= x0 as f32 && x < x1 as f32 && y >= y0 as f32 && y < y1 as f32
        })
    });
    Scores { count, colour, shape, position, aesthetic: aesthetic(a) }
}

/// The contrarian: it likes one big, centred blob. Half the largest object's area (full marks
/// at a quarter of the canvas), half how close its centre is to the canvas centre; specks and
/// every other object are ignored. Ground truth for "four small squares on the left" scores low.
pub fn aesthetic(a: &Analysis) -> f64 {
    let Some(big) = a.objects.iter().max_by_key(|o| o.area) else { return 0.0 };
    let s = SIZE as f64;
    let coverage = (big.area as f64 / (s * s) / 0.25).min(1.0);
    let (cx, cy) = (big.centroid.0 as f64 - s / 2.0, big.centroid.1 as f64 - s / 2.0);
    let centred = 1.0 - (cx * cx + cy * cy).sqrt() / (s / 2.0 * std::f64::consts::SQRT_2);
    0.5 * coverage + 0.5 * centred
}

/// Every scorer on one image.
pub fn score(img: &RgbImage, prompt: &Prompt) -> Scores {
    score_analysis(&analyse(img), prompt)
}
