//! The built-in world: prompts from a small grammar ("three red circles on the left"), a
//! renderer that draws a matching 32x32 image, and scorers a program can check (count, colour,
//! shape, position, and a contrarian "aesthetic"). Everything is deterministic from a seed, so
//! the demo can show what preference optimization did without downloading anything.

pub mod demo;
pub mod model;
pub mod plot;
pub mod prefs;
pub mod render;
pub mod score;

use crate::error::{Error, Result};

/// Image side in pixels.
pub const SIZE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
}

pub const COLOURS: [Colour; 4] = [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow];
pub const SHAPES: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
pub const POSITIONS: [Position; 4] = [Position::Left, Position::Right, Position::Top, Position::Bottom];
const NUMBERS: [&str; 4] = ["one", "two", "three", "four"];

impl Colour {
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
        }
    }
    /// The colour's sRGB value (the renderer jitters around it; the scorers measure against it).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [215, 40, 40],
            Colour::Green => [40, 165, 60],
            Colour::Blue => [45, 80, 215],
            Colour::Yellow => [235, 200, 35],
        }
    }
}

impl Shape {
    pub fn name(self, plural: bool) -> &'static str {
        match (self, plural) {
            (Shape::Circle, false) => "circle",
            (Shape::Circle, true) => "circles",
            (Shape::Square, false) => "square",
            (Shape::Square, true) => "squares",
            (Shape::Triangle, false) => "triangle",
            (Shape::Triangle, true) => "triangles",
        }
    }
}

impl Position {
    pub fn phrase(self) -> &'static str {
        match self {
            Position::Left => "on the left",
            Position::Right => "on the right",
            Position::Top => "at the top",
            Position::Bottom => "at the bottom",
        }
    }
    /// The half of the canvas, as [x0, y0, x1, y1) in pixels.
    pub fn region(self) -> [usize; 4] {
        let h = SIZE / 2;
        match self {
            Position::Left => [0, 0, h, SIZE],
            Position::Right => [h, 0, SIZE, SIZE],
            Position::Top => [0, 0, SIZE, h],
            Position::Bottom => [0, h, SIZE, SIZE],
        }
    }
}

/// One prompt of the world's grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prompt {
    /// 1 to 4 (others are drawn and named as the nearest of those).
    pub count: u8,
    pub colour: Colour,
    pub shape: Shape,
    pub position: Option<Position>,
}

impl Prompt {
    /// Every prompt of the grammar: 4 counts x 4 colours x 3 shapes x 5 placements = 240.
    pub fn all() -> Vec<Prompt> {
        let mut out = Vec::with_capacity(240);
        for count in 1..=4u8 {
            for colour in COLOURS {
                for shape in SHAPES {
                    out.push(Prompt { count, colour, shape, position: None });
                    for p in POSITIONS {
                        out.push(Prompt { count, colour, shape, position: Some(p) });
                    }
                }
            }
        }
        out
    }

    /// A prompt drawn uniformly from [`Prompt::all`].
    pub fn random(rng: &mut crate::rng::Rng) -> Prompt {
        let count = 1 + rng.below(4) as u8;
        let colour = COLOURS[rng.below(4)];
        let shape = SHAPES[rng.below(3)];
        let position = match rng.below(5) {
            4 => None,
            i => Some(POSITIONS[i]),
        };
        Prompt { count, colour, shape, position }
    }

    /// The caption a careless annotator writes for an image of `self`: each attribute (count,
    /// colour, shape, placement) is independently replaced by a different value with
    /// probability `rate`. Pretraining on such captions gives a base model that follows prompts
    /// only partly because its data did — as web-captioned models do — so that preferences
    /// from the scorers have something to teach it.
    pub fn miscaption(&self, rng: &mut crate::rng::Rng, rate: f32) -> Prompt {
        let mut c = *self;
        if rng.uniform() < rate {
            c.count = 1 + ((self.count.clamp(1, 4) as usize - 1 + 1 + rng.below(3)) % 4) as u8;
        }
        if rng.uniform() < rate {
            c.colour = COLOURS[(self.colour as usize + 1 + rng.below(3)) % 4];
        }
        if rng.uniform() < rate {
            c.shape = SHAPES[(self.shape as usize + 1 + rng.below(2)) % 3];
        }
        if rng.uniform() < rate {
            // Five placements: none, left, right, top, bottom.
            let now = self.position.map_or(0, |p| p as usize + 1);
            c.position = match (now + 1 + rng.below(4)) % 5 {
                0 => None,
                i => Some(POSITIONS[i - 1]),
            };
        }
        c
    }

    /// "three red circles on the left"
    pub fn text(&self) -> String {
        let mut s = format!(
            "{} {} {}",
            NUMBERS[(self.count.clamp(1, 4) - 1) as usize],
            self.colour.name(),
            self.shape.name(self.count > 1)
        );
        if let Some(p) = self.position {
            s.push(' ');
            s.push_str(p.phrase());
        }
        s
    }

    /// The inverse of [`Prompt::text`] (whitespace and case are forgiven).
    pub fn parse(text: &str) -> Result<Prompt> {
        let bad = |why: &str| Error::Invalid(format!("world prompt {text:?}: {why}"));
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.len() < 3 {
            return Err(bad("expected COUNT COLOUR SHAPE [POSITION], e.g. \"three red circles on the left\""));
        }
        let count =
            NUMBERS.iter().position(|n| *n == words[0]).ok_or_else(|| bad("count must be one..four"))? as u8 + 1;
        let colour = *COLOURS
            .iter()
            .find(|c| c.name() == words[1])
            .ok_or_else(|| bad("colour must be red/green/blue/yellow"))?;
        let shape = *SHAPES
            .iter()
            .find(|s| s.name(count > 1) == words[2])
            .ok_or_else(|| bad("shape must be circle/square/triangle, plural after two..four"))?;
        let rest = words[3..].join(" ");
        let position = if rest.is_empty() {
            None
        } else {
            Some(*POSITIONS.iter().find(|p| p.phrase() == rest).ok_or_else(|| {
                bad("position must be \"on the left\", \"on the right\", \"at the top\" or \"at the bottom\"")
            })?)
        };
        Ok(Prompt { count, colour, shape, position })
    }

    /// Held-out prompts (one in five, spread over every count, colour, shape and placement):
    /// the demo scores on these and never trains on them.
    pub fn is_held_out(&self) -> bool {
        let (c, col, sh) = (self.count.saturating_sub(1) as usize, self.colour as usize, self.shape as usize);
        let pos = self.position.map(|p| p as usize + 1).unwrap_or(0);
        (c + col * 2 + sh * 3 + pos).is_multiple_of(5)
    }
}

/// Every word of the grammar, for the tokenizer.
pub fn vocabulary() -> Vec<&'static str> {
    let mut w: Vec<&'static str> = NUMBERS.to_vec();
    w.extend(COLOURS.iter().map(|c| c.name()));
    for s in SHAPES {
        w.push(s.name(false));
        w.push(s.name(true));
    }
    w.extend(["on", "the", "at", "left", "right", "top", "bottom"]);
    w
}
