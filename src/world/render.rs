//! Draws the ground-truth image of a prompt: `count` shapes of one colour on a near-white
//! background, sizes and places drawn from a seed, never touching each other (so every scorer
//! can find them), all inside the prompt's half of the canvas when it names one.

use super::{Prompt, Shape, SIZE};
use crate::image_io::RgbImage;
use crate::rng::Rng;

/// The background every image is drawn on (scorers measure against it).
pub const BACKGROUND: [u8; 3] = [245, 245, 240];

/// One drawn object: top-left corner and side of its bounding square.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placed {
    pub x: usize,
    pub y: usize,
    pub side: usize,
}

/// Does pixel (px, py) lie in `shape` drawn in the square at (x, y) with side `s`? Circles
/// and upward triangles by their pixel centres, so small shapes stay recognisable.
pub fn covers(shape: Shape, p: Placed, px: usize, py: usize) -> bool {
    if px < p.x || py < p.y || px >= p.x + p.side || py >= p.y + p.side {
        return false;
    }
    let s = p.side as f32;
    let (fx, fy) = (px as f32 + 0.5 - p.x as f32, py as f32 + 0.5 - p.y as f32);
    match shape {
        Shape::Square => true,
        Shape::Circle => {
            let r = s / 2.0;
            (fx - r).powi(2) + (fy - r).powi(2) <= r * r
        }
        Shape::Triangle => (fx - s / 2.0).abs() <= fy / 2.0 + 0.25,
    }
}

/// Object sides for a count: fewer objects may be larger.
fn side_range(count: u8, in_half: bool) -> (usize, usize) {
    match (count, in_half) {
        (1, false) => (10, 18),
        (1, true) => (8, 13),
        (2, false) => (8, 13),
        (2, true) => (7, 11),
        (_, false) => (7, 10),
        (_, true) => (6, 8),
    }
}

/// Places the prompt's objects: rejection sampling with a 2-pixel gap, shrinking the sizes
/// when a layout does not fit (always terminates: 4 objects of side 5 fit any half).
pub fn layout(prompt: &Prompt, rng: &mut Rng) -> Vec<Placed> {
    let [x0, y0, x1, y1] = prompt.position.map(|p| p.region()).unwrap_or([0, 0, SIZE, SIZE]);
    // One pixel of margin to the canvas edge.
    let (x0, y0, x1, y1) = (x0.max(1), y0.max(1), x1.min(SIZE - 1), y1.min(SIZE - 1));
    let (mut lo, mut hi) = side_range(prompt.count, prompt.position.is_some());
    loop {
        for _attempt in 0..200 {
            let mut placed: Vec<Placed> = Vec::with_capacity(prompt.count as usize);
            for _ in 0..prompt.count {
                let side = lo + rng.below(hi - lo + 1);
                let mut ok = None;
                for _try in 0..50 {
                    if x1 - x0 < side || y1 - y0 < side {
                        break;
                    }
                    let x = x0 + rng.below(x1 - x0 - side + 1);
                    let y = y0 + rng.below(y1 - y0 - side + 1);
                    let free = placed.iter().all(|q| {
                        x + side + 2 <= q.x || q.x + q.side + 2 <= x || y + side + 2 <= q.y || q.y + q.side + 2 <= y
                    });
                    if free {
                        ok = Some(Placed { x, y, side });
                        break;
                    }
                }
                match ok {
                    Some(p) => placed.push(p),
                    None => break,
                }
            }
            if placed.len() == prompt.count as usize {
                return placed;
            }
        }
        if hi > lo {
            hi -= 1;
        } else if lo > 5 {
            lo -= 1;
            hi = lo;
        } else {
            // Unreachable for the grammar's prompts; an empty layout is still a valid image.
            return Vec::new();
        }
    }
}

/// The prompt's image for `seed`: a slightly tinted background and objects whose colour is
/// jittered a little (per image), so no two renders are the same.
pub fn render(prompt: &Prompt, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed ^ 0x0b1e_c75e_ed00_0001);
    let objects = layout(prompt, &mut rng);
    let mut jitter = |v: u8, amp: f32| ((v as f32) + (rng.uniform() * 2.0 - 1.0) * amp).round().clamp(0.0, 255.0) as u8;
    let bg = BACKGROUND.map(|v| jitter(v, 6.0));
    let fg = prompt.colour.rgb().map(|v| jitter(v, 14.0));
    let mut data = Vec::with_capacity(SIZE * SIZE * 3);
    for py in 0..SIZE {
        for px in 0..SIZE {
            let hit = objects.iter().any(|&o| covers(prompt.shape, o, px, py));
            data.extend_from_slice(if hit { &fg } else { &bg });
        }
    }
    RgbImage { width: SIZE, height: SIZE, data }
}

/// Images (H, W, 3) bytes -> (B, 3, H, W) floats in [-1, 1], the model's pixel space.
pub fn to_pixels(images: &[RgbImage]) -> Vec<f32> {
    let mut out = Vec::with_capacity(images.len() * 3 * SIZE * SIZE);
    for img in images {
        let hw = img.width * img.height;
        for c in 0..3 {
            out.extend((0..hw).map(|p| img.data[p * 3 + c] as f32 / 127.5 - 1.0));
        }
    }
    out
}
