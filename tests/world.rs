//! The built-in world (`src/world/`): the prompt grammar, the renderer and the scorers (full
//! marks for ground truth, low marks for renders of other prompts, the contrarian aesthetic),
//! the BPE tokenizer over the grammar's words, the shipped base model in `models/world`,
//! preference sets in the three regimes, batch-independent sampling, the quick demo end to end
//! (the CI demo run), the report's statistics, and the picture helpers (grids and charts, PNG).
//!
//! Everything that runs the shipped model runs it on the CPU.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use vipo::data::agree::{agreement, DEFAULT_TIE_TOL};
use vipo::data::{DataSource, ImageSource, PairStream, StreamOptions};
use vipo::image_io::{read_png, write_png, RgbImage};
use vipo::models::clip_text::{ClipTextConfig, ClipTextModel};
use vipo::models::clip_tokenizer::ClipTokenizer;
use vipo::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use vipo::params::ParamStore;
use vipo::pipelines::stable_diffusion::StableDiffusion;
use vipo::rng::Rng;
use vipo::world::demo::{compare, estimate, eval_jobs, metric_names, DemoOptions, Estimate, Eval};
use vipo::world::model::{self as wmodel, MAX_LENGTH};
use vipo::world::plot::{colour, compose, line_chart, upscale, Series};
use vipo::world::prefs::{self, build, corrupt, sample_images, Candidate, Regime, SampleSettings};
use vipo::world::render::{layout, render, to_pixels, BACKGROUND};
use vipo::world::score::{analyse, score, Scores, SCORERS, TASK_SCORERS};
use vipo::world::{vocabulary, Colour, Position, Prompt, Shape, COLOURS, POSITIONS, SHAPES, SIZE};
use vipo::Device;

/// Random (prompt, seed) cases for the renderer and scorer properties (the issue asks for
/// thousands).
const CASES: usize = 3000;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo-world-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn shipped() -> PathBuf {
    root().join("models/world")
}

/// Runs the binary in the crate root (where `models/world` is the default model).
fn vipo(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vipo")).current_dir(root()).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn opposite(p: Position) -> Position {
    match p {
        Position::Left => Position::Right,
        Position::Right => Position::Left,
        Position::Top => Position::Bottom,
        Position::Bottom => Position::Top,
    }
}

/// A value of `all` other than `v`, drawn uniformly.
fn other<T: Copy + PartialEq>(all: &[T], v: T, rng: &mut Rng) -> T {
    let rest: Vec<T> = all.iter().copied().filter(|x| *x != v).collect();
    rest[rng.below(rest.len())]
}

// ---------------------------------------------------------------------------------------------
// 1. Grammar

/// The careless captions of `world pretrain --caption-noise`: each attribute is wrong at the
/// asked rate, independently, and a wrong one is never the true value; every replacement value
/// occurs (no attribute is stuck on one wrong value).
#[test]
fn miscaptions_are_wrong_at_their_rate() {
    let mut rng = Rng::new(11);
    for rate in [0.0f32, 0.3, 1.0] {
        let n = 20_000;
        let mut wrong = [0usize; 4];
        let mut seen: [BTreeSet<String>; 4] = Default::default();
        let mut all_four = 0;
        for _ in 0..n {
            let p = Prompt::random(&mut rng);
            let c = p.miscaption(&mut rng, rate);
            let w = [c.count != p.count, c.colour != p.colour, c.shape != p.shape, c.position != p.position];
            for (k, &x) in w.iter().enumerate() {
                wrong[k] += x as usize;
            }
            all_four += w.iter().all(|&x| x) as usize;
            seen[0].insert(c.count.to_string());
            seen[1].insert(format!("{:?}", c.colour));
            seen[2].insert(format!("{:?}", c.shape));
            seen[3].insert(format!("{:?}", c.position));
            assert!((1..=4).contains(&c.count));
            assert_eq!(Prompt::parse(&c.text()).unwrap(), c);
        }
        for (k, w) in wrong.iter().enumerate() {
            let f = *w as f64 / n as f64;
            // 4.5 standard errors of a binomial proportion at n = 20000 is below 0.016.
            assert!((f - rate as f64).abs() < 0.016, "rate {rate}: attribute {k} wrong in {f:.3} of captions");
        }
        let all_f = all_four as f64 / n as f64;
        assert!((all_f - (rate as f64).powi(4)).abs() < 0.016, "rate {rate}: all four wrong in {all_f:.3}");
        if rate > 0.0 {
            assert_eq!(seen.iter().map(BTreeSet::len).collect::<Vec<_>>(), vec![4, 4, 3, 5], "rate {rate}");
        }
    }
    // At rate 1 every wrong value is equally likely for each true value: 1/(k-1) of the cases.
    let mut pairs: [BTreeMap<(String, String), usize>; 4] = Default::default();
    let mut truths: [BTreeMap<String, usize>; 4] = Default::default();
    for _ in 0..40_000 {
        let p = Prompt::random(&mut rng);
        let c = p.miscaption(&mut rng, 1.0);
        let kv = [
            (p.count.to_string(), c.count.to_string()),
            (format!("{:?}", p.colour), format!("{:?}", c.colour)),
            (format!("{:?}", p.shape), format!("{:?}", c.shape)),
            (format!("{:?}", p.position), format!("{:?}", c.position)),
        ];
        for (k, (t, v)) in kv.into_iter().enumerate() {
            *truths[k].entry(t.clone()).or_default() += 1;
            *pairs[k].entry((t, v)).or_default() += 1;
        }
    }
    for (k, values) in [4usize, 4, 3, 5].into_iter().enumerate() {
        assert_eq!(pairs[k].len(), values * (values - 1), "attribute {k}: {:?}", pairs[k]);
        for ((t, v), &n) in &pairs[k] {
            let f = n as f64 / truths[k][t] as f64;
            let want = 1.0 / (values - 1) as f64;
            assert!((f - want).abs() < 0.05, "attribute {k}: {t} captioned {v} in {f:.3} of cases, want {want:.3}");
        }
    }
}

#[test]
fn grammar_round_trips_and_names_bad_parts() {
    let all = Prompt::all();
    assert_eq!(all.len(), 4 * COLOURS.len() * SHAPES.len() * (POSITIONS.len() + 1));
    assert_eq!(all.len(), 240);
    let distinct: BTreeSet<Prompt> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 240, "Prompt::all() repeats a prompt");
    let texts: BTreeSet<String> = all.iter().map(Prompt::text).collect();
    assert_eq!(texts.len(), 240, "two prompts share a text");
    for p in &all {
        let t = p.text();
        assert_eq!(Prompt::parse(&t).unwrap(), *p, "{t:?}");
        // Case and whitespace are forgiven.
        let shouty = format!("  {}  ", t.to_uppercase().replace(' ', " \t "));
        assert_eq!(Prompt::parse(&shouty).unwrap(), *p, "{shouty:?}");
        // Plural after two..four, singular after one.
        let shape_word = t.split(' ').nth(2).unwrap();
        assert_eq!(shape_word.ends_with('s'), p.count > 1, "{t:?}");
    }
    assert_eq!(
        Prompt::parse("three red circles on the left").unwrap(),
        Prompt { count: 3, colour: Colour::Red, shape: Shape::Circle, position: Some(Position::Left) }
    );
    // Each bad input's error names the bad part (and quotes the input).
    for (bad, part) in [
        ("five red circles", "count"),
        ("zero red circles", "count"),
        ("one purple circle", "colour"),
        ("two red", "expected COUNT COLOUR SHAPE"),
        ("", "expected COUNT COLOUR SHAPE"),
        ("one red circles", "shape"),
        ("two red circle", "shape"),
        ("two red hexagons", "shape"),
        ("two red circles in the middle", "position"),
        ("two red circles on the", "position"),
        ("two red circles on the left please", "position"),
    ] {
        let err = Prompt::parse(bad).expect_err(bad).to_string();
        assert!(err.contains(part), "{bad:?}: {err}");
        assert!(err.contains(&format!("{bad:?}")), "{bad:?}: the error does not quote the input: {err}");
    }
}

#[test]
fn held_out_prompts_cover_every_attribute() {
    let all = Prompt::all();
    let (held, train): (Vec<Prompt>, Vec<Prompt>) = all.iter().partition(|p| p.is_held_out());
    // "One in five": 240 / 5 = 48, allowed +-8 (one sixth of it).
    assert!((40..=56).contains(&held.len()), "{} held-out prompts of 240", held.len());
    for (name, set) in [("held-out", &held), ("training", &train)] {
        let counts: BTreeSet<u8> = set.iter().map(|p| p.count).collect();
        let colours: BTreeSet<Colour> = set.iter().map(|p| p.colour).collect();
        let shapes: BTreeSet<Shape> = set.iter().map(|p| p.shape).collect();
        let places: BTreeSet<Option<Position>> = set.iter().map(|p| p.position).collect();
        assert_eq!(counts, (1..=4).collect(), "{name} counts");
        assert_eq!(colours, COLOURS.into_iter().collect(), "{name} colours");
        assert_eq!(shapes, SHAPES.into_iter().collect(), "{name} shapes");
        let mut want: BTreeSet<Option<Position>> = POSITIONS.into_iter().map(Some).collect();
        want.insert(None);
        assert_eq!(places, want, "{name} placements");
    }
    // The demo's training prompts never include a held-out one.
    let tp = vipo::world::demo::train_prompts(1000, 0);
    assert_eq!(tp.len(), train.len());
    assert!(tp.iter().all(|p| !p.is_held_out()));
    // The CLI lists the same prompts.
    let (ok, out, err) = vipo(&["world", "prompts"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().map(String::from).collect::<Vec<_>>(), all.iter().map(Prompt::text).collect::<Vec<_>>());
    let (ok, out, err) = vipo(&["world", "prompts", "--held-out"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().map(String::from).collect::<Vec<_>>(), held.iter().map(Prompt::text).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// 2. Renderer and scorers

/// Ground truth scores exactly 1 on every task scorer that applies, for thousands of random
/// (prompt, seed) pairs; renders are deterministic per seed and differ across seeds; layouts
/// keep a 2-pixel gap inside the prompt's half, so the scorer finds exactly `count` objects.
#[test]
fn ground_truth_gets_full_marks() {
    let mut rng = Rng::new(2024);
    let mut by_count = [0usize; 4];
    let mut with_position = 0;
    for case in 0..CASES {
        let p = Prompt::random(&mut rng);
        let seed = rng.next_u64();
        let img = render(&p, seed);
        assert_eq!((img.width, img.height, img.data.len()), (SIZE, SIZE, SIZE * SIZE * 3));
        assert_eq!(img, render(&p, seed), "{} seed {seed}: render is not deterministic", p.text());
        assert_ne!(img, render(&p, seed ^ 1), "{} seed {seed}: seeds {seed} and {} render alike", p.text(), seed ^ 1);

        let a = analyse(&img);
        assert_eq!(a.objects.len(), p.count as usize, "{} seed {seed}: objects touch or vanish", p.text());
        let s = score(&img, &p);
        let what = format!("case {case}: {:?} for {} seed {seed}", s, p.text());
        assert_eq!(s.count, 1.0, "{what}");
        assert_eq!(s.colour, 1.0, "{what}");
        assert_eq!(s.shape, 1.0, "{what}");
        assert_eq!(s.position, p.position.map(|_| 1.0), "{what}");
        assert!(s.all_correct(), "{what}");
        assert_eq!(s.task(), 1.0, "{what}");
        assert!(s.aesthetic > 0.0 && s.aesthetic <= 1.0, "{what}");

        // The layout itself (same generator as render's, another seed): `count` squares of side
        // >= 5, one pixel off the canvas edge, inside the prompt's half, 2 pixels apart.
        let mut lr = Rng::new(seed);
        let placed = layout(&p, &mut lr);
        assert_eq!(placed.len(), p.count as usize, "{what}");
        let [x0, y0, x1, y1] = p.position.map(|q| q.region()).unwrap_or([0, 0, SIZE, SIZE]);
        for (i, o) in placed.iter().enumerate() {
            assert!(o.side >= 5, "{what}: {o:?}");
            assert!(o.x >= x0.max(1) && o.y >= y0.max(1), "{what}: {o:?}");
            assert!(o.x + o.side <= x1.min(SIZE - 1) && o.y + o.side <= y1.min(SIZE - 1), "{what}: {o:?}");
            for q in &placed[i + 1..] {
                let apart = o.x + o.side + 2 <= q.x
                    || q.x + q.side + 2 <= o.x
                    || o.y + o.side + 2 <= q.y
                    || q.y + q.side + 2 <= o.y;
                assert!(apart, "{what}: {o:?} and {q:?} are closer than 2 pixels");
            }
        }
        by_count[p.count as usize - 1] += 1;
        with_position += p.position.is_some() as usize;
    }
    // The random prompts covered the grammar (each count ~750, positions ~4/5 of 3000).
    assert!(by_count.iter().all(|&n| n > CASES / 8), "{by_count:?}");
    assert!(with_position > CASES / 2, "{with_position}");
}

/// Render prompt B, score it against prompt A where A and B differ in exactly one attribute.
/// Every bound follows from the scorer's definition and from ground truth scoring 1 for its own
/// prompt (checked above: the analysis finds B's `count` objects, each labelled with B's colour,
/// classified as B's shape, centroid inside B's half):
/// - count: 1 / (1 + |found - wanted|) with found = B's count != A's: at most 1/2;
/// - colour: the area of A's colour over all object area; every object has B's colour: 0;
/// - shape: the fraction of objects classified as A's shape; all are B's shape: 0;
/// - position: the fraction of centroids in A's half; all lie in B's half, which is disjoint
///   from A's (opposite halves): 0.
///
/// The other applicable task scorers still give 1, so the task score is at most
/// 1 - (1 - bound) / (number of task scorers), and the image is never all correct.
#[test]
fn renders_of_other_prompts_get_low_marks() {
    let mut rng = Rng::new(77);
    let mut n = BTreeMap::<&str, usize>::new();
    for _ in 0..CASES {
        let mut a = Prompt::random(&mut rng);
        let seed = rng.next_u64();
        let attr = ["count", "colour", "shape", "position"][rng.below(4)];
        let mut b = a;
        match attr {
            "count" => {
                let counts = [1u8, 2, 3, 4];
                b.count = other(&counts, a.count, &mut rng);
            }
            "colour" => b.colour = other(&COLOURS, a.colour, &mut rng),
            "shape" => b.shape = other(&SHAPES, a.shape, &mut rng),
            _ => {
                let pa = a.position.unwrap_or(POSITIONS[rng.below(4)]);
                a.position = Some(pa);
                b.position = Some(opposite(pa));
            }
        }
        let s = score(&render(&b, seed), &a);
        let what = format!("{attr}: render of {:?} scored for {:?} (seed {seed}): {s:?}", b.text(), a.text());
        let bound = match attr {
            "count" => 0.5,
            _ => 0.0,
        };
        let got = s.get(attr).unwrap();
        assert!(got <= bound, "{what}");
        for other_attr in TASK_SCORERS.iter().filter(|x| **x != attr) {
            if let Some(v) = s.get(other_attr) {
                assert_eq!(v, 1.0, "{what}: {other_attr} should still give full marks");
            }
        }
        let k = TASK_SCORERS.iter().filter(|x| s.get(x).is_some()).count() as f64;
        assert!(s.task() <= 1.0 - (1.0 - bound) / k + 1e-12, "{what}");
        assert!(!s.all_correct(), "{what}");
        *n.entry(attr).or_default() += 1;
    }
    // Thousands of cases, each attribute hundreds of times.
    assert!(n.values().all(|&c| c > CASES / 8), "{n:?}");
}

/// The contrarian likes one big centred blob: one-object renders without a place score higher
/// on average than four-object renders in a half, which the task scorers rate the same (both
/// ground truth). Over random prompts A and renders of random other prompts B scored against A,
/// the task scorers prefer A's ground truth, and the aesthetic prefers the other image on a
/// substantial fraction of those pairs (but not on all: it is not just the negated task score).
#[test]
fn aesthetic_disagrees_with_the_task_on_purpose() {
    let mut rng = Rng::new(5);
    let n = 1000;
    let mut one = Vec::with_capacity(n);
    let mut four = Vec::with_capacity(n);
    for _ in 0..n {
        let colour = COLOURS[rng.below(4)];
        let shape = SHAPES[rng.below(3)];
        let p1 = Prompt { count: 1, colour, shape, position: None };
        let p4 = Prompt { count: 4, colour, shape, position: Some(POSITIONS[rng.below(4)]) };
        let (s1, s4) = (score(&render(&p1, rng.next_u64()), &p1), score(&render(&p4, rng.next_u64()), &p4));
        assert!(s1.all_correct() && s4.all_correct());
        one.push(s1.aesthetic);
        four.push(s4.aesthetic);
    }
    let (e1, e4) = (estimate(&one), estimate(&four));
    eprintln!("aesthetic: one object {e1:?}, four in a half {e4:?}");
    // A clear margin: the difference of the means is at least 0.02 (measured 0.046 with these
    // seeds) and three times the half-width of its 95% interval (independent samples:
    // sqrt(ci1^2 + ci4^2), ~0.009 at n = 1000).
    let d = e1.mean - e4.mean;
    assert!(d > 0.02 && d > 3.0 * e1.ci95.hypot(e4.ci95), "one {e1:?} vs four {e4:?}");

    let (mut decided, mut disagree) = (0usize, 0usize);
    for _ in 0..2 * CASES / 3 {
        let a = Prompt::random(&mut rng);
        let b = Prompt::random(&mut rng);
        if a == b {
            continue;
        }
        let truth = score(&render(&a, rng.next_u64()), &a);
        let wrong = score(&render(&b, rng.next_u64()), &a);
        if (truth.task() - wrong.task()).abs() <= 1e-6 || (truth.aesthetic - wrong.aesthetic).abs() <= 1e-6 {
            continue; // a tie on either side: no verdict to compare
        }
        assert!(truth.task() > wrong.task(), "{} vs a render of {}: {truth:?} {wrong:?}", a.text(), b.text());
        decided += 1;
        disagree += (wrong.aesthetic > truth.aesthetic) as usize;
    }
    let frac = disagree as f64 / decided as f64;
    eprintln!("aesthetic prefers the wrong image on {disagree} of {decided} pairs ({frac:.3})");
    assert!(decided > CASES / 3, "{decided}");
    // "Substantial": at least a quarter; "not just negated": at most three quarters.
    assert!((0.25..=0.75).contains(&frac), "aesthetic disagrees with the task on {frac:.3} of pairs");
}

/// A corrupted image (noise and rotated channels, what the trivial regime rejects) scores
/// lower on the task than the ground truth it came from.
#[test]
fn corrupted_images_score_lower() {
    let mut rng = Rng::new(99);
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let p = Prompt::random(&mut rng);
        let seed = rng.next_u64();
        let truth = render(&p, seed);
        let bad = corrupt(&truth, seed);
        assert_eq!((bad.width, bad.height, bad.data.len()), (truth.width, truth.height, truth.data.len()));
        assert_ne!(bad, truth);
        assert_eq!(bad, corrupt(&truth, seed), "corrupt is not deterministic");
        let (st, sb) = (score(&truth, &p), score(&bad, &p));
        assert!(sb.task() < st.task(), "{} seed {seed}: corrupted {sb:?} vs truth {st:?}", p.text());
        assert!(!sb.all_correct());
        tasks.push(sb.task());
    }
    let e = estimate(&tasks);
    eprintln!("task score of corrupted ground truth: {e:?}");
    // Far below the ground truth's 1 on average, not just below it.
    assert!(e.mean + e.ci95 < 0.75, "{e:?}");
}

/// The renderer's colours and background are what the scorers measure against, and the pixel
/// conversion maps bytes to [-1, 1] channel-first.
#[test]
fn pixels_are_channel_first_in_unit_range() {
    let p = Prompt::parse("two blue triangles at the top").unwrap();
    let imgs = [render(&p, 3), render(&p, 4)];
    let px = to_pixels(&imgs);
    assert_eq!(px.len(), 2 * 3 * SIZE * SIZE);
    for (b, img) in imgs.iter().enumerate() {
        for c in 0..3 {
            for i in [0, 17, SIZE * SIZE / 2 + 5, SIZE * SIZE - 1] {
                let want = img.data[i * 3 + c] as f32 / 127.5 - 1.0;
                assert_eq!(px[(b * 3 + c) * SIZE * SIZE + i], want);
            }
        }
    }
    // The background corner is within the renderer's +-6 jitter of BACKGROUND.
    for (got, want) in imgs[0].data[..3].iter().zip(BACKGROUND) {
        assert!(got.abs_diff(want) <= 6, "{:?} vs {BACKGROUND:?}", &imgs[0].data[..3]);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Tokenizer

#[test]
fn tokenizer_has_one_token_per_word() {
    let dir = tmp("tok");
    wmodel::write_skeleton(&dir).unwrap();
    assert_eq!(wmodel::tokenizer_files(), wmodel::tokenizer_files(), "tokenizer files are not deterministic");
    let tok = ClipTokenizer::from_dir(dir.join("tokenizer")).unwrap();
    assert_eq!(tok.max_length(), MAX_LENGTH);
    // The text encoder's config agrees with the tokenizer.
    let te = wmodel::text_encoder_config();
    assert_eq!(te["vocab_size"].as_u64().unwrap() as usize, tok.vocab_size());
    assert_eq!(te["bos_token_id"].as_u64().unwrap() as u32, tok.bos_id());
    assert_eq!(te["eos_token_id"].as_u64().unwrap() as u32, tok.eos_id());
    assert_eq!(te["max_position_embeddings"].as_u64().unwrap() as usize, MAX_LENGTH);

    let mut ids = BTreeMap::new();
    for w in vocabulary() {
        let enc = tok.encode(w).unwrap();
        assert_eq!(enc.len(), 3, "{w:?} is not one token: {enc:?} {:?}", tok.tokens(w).unwrap());
        assert_eq!((enc[0], enc[2]), (tok.bos_id(), tok.eos_id()));
        assert_eq!(tok.tokens(w).unwrap(), [format!("{w}</w>")]);
        ids.insert(w, enc[1]);
    }
    let distinct: BTreeSet<u32> = ids.values().copied().collect();
    assert_eq!(distinct.len(), vocabulary().len(), "two words share a token");

    for p in Prompt::all() {
        let text = p.text();
        let t = tok.encode_prompt(&text).unwrap();
        let words: Vec<&str> = text.split(' ').collect();
        let mut want = vec![tok.bos_id()];
        want.extend(words.iter().map(|w| ids[w]));
        want.push(tok.eos_id());
        want.resize(MAX_LENGTH, tok.pad_id());
        assert_eq!(t.ids, want, "{text:?}");
        assert_eq!(t.truncated_from, None);
        assert_eq!(tok.decode(&tok.encode(&text).unwrap()), text);
    }
    // A word outside the grammar still encodes, from byte-level pieces.
    let enc = tok.encode("one purple circle").unwrap();
    assert!(enc.len() > 5, "{enc:?}");
    assert_eq!((enc[1], enc[enc.len() - 2]), (ids["one"], ids["circle"]));
    assert_eq!(tok.decode(&enc), "one purple circle");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 4. The shipped model

fn json_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Key -> shape of a store.
fn shapes(store: &ParamStore) -> BTreeMap<String, Vec<usize>> {
    store.iter().map(|(k, p)| (k.to_string(), p.value().shape().to_vec())).collect()
}

#[test]
fn shipped_model_is_what_the_code_describes() {
    let dir = shipped();
    assert_eq!(json_file(&dir.join("unet/config.json")), wmodel::unet_config());
    assert_eq!(json_file(&dir.join("text_encoder/config.json")), wmodel::text_encoder_config());
    assert_eq!(json_file(&dir.join("scheduler/scheduler_config.json")), wmodel::scheduler_config());
    assert_eq!(json_file(&dir.join("model_index.json")), wmodel::model_index());
    let (vocab, merges) = wmodel::tokenizer_files();
    assert_eq!(json_file(&dir.join("tokenizer/vocab.json")), serde_json::from_str::<Value>(&vocab).unwrap());
    assert_eq!(std::fs::read_to_string(dir.join("tokenizer/merges.txt")).unwrap(), merges);

    let sd = StableDiffusion::from_dir(&dir, &Device::Cpu, None).unwrap();
    assert!(sd.is_pixel_space());
    assert_eq!((sd.unet.config.in_channels, sd.unet.config.out_channels), (3, 3));
    assert_eq!(sd.vae_scale_factor(), 1);
    assert_eq!(sd.tokenizer.max_length(), MAX_LENGTH);

    // The weights have exactly the parameters (names and shapes) of the described models.
    let cfg_dir = tmp("cfg");
    wmodel::write_skeleton(&cfg_dir).unwrap();
    let ucfg = UNet2DConditionConfig::from_file(cfg_dir.join("unet/config.json")).unwrap();
    let tcfg = ClipTextConfig::from_file(cfg_dir.join("text_encoder/config.json")).unwrap();
    let (_, ustore) = UNet2DConditionModel::init_params(&ucfg, 0, &Device::Cpu).unwrap();
    let (_, tstore) = ClipTextModel::init_params(&tcfg, 0, &Device::Cpu).unwrap();
    assert_eq!(shapes(&sd.unet_params), shapes(&ustore));
    let shipped_te = ParamStore::load_safetensors(dir.join("text_encoder/model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(shapes(&shipped_te), shapes(&tstore));
    // Trained, not the random initialisation.
    let w = |s: &ParamStore| s.get("conv_in.weight").unwrap().value().to_vec().unwrap();
    assert_ne!(w(&sd.unet_params), w(&ustore));
    let _ = std::fs::remove_dir_all(&cfg_dir);
}

#[test]
fn shipped_model_samples_through_the_cli() {
    let dir = tmp("cli-sample");
    let out = dir.join("x.png");
    let prompt = "two red squares on the left";
    let (ok, _, err) = vipo(&[
        "sample",
        "--model",
        "models/world",
        "--prompt",
        prompt,
        "--steps",
        "4",
        "--width",
        "32",
        "--height",
        "32",
        "--seed",
        "1",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "vipo sample failed: {err}");
    let (img, _) = read_png(&out).unwrap();
    assert_eq!((img.width, img.height), (32, 32));
    assert!(img.data.iter().any(|&v| v != img.data[0]), "a flat sample");

    // `world render` writes the ground truth, `world score` scores both like the library.
    let gt = dir.join("gt.png");
    let (ok, _, err) = vipo(&["world", "render", prompt, "--seed", "9", "--out", gt.to_str().unwrap()]);
    assert!(ok, "{err}");
    let p = Prompt::parse(prompt).unwrap();
    assert_eq!(read_png(&gt).unwrap().0, render(&p, 9));

    let (ok, stdout, err) = vipo(&["world", "score", prompt, out.to_str().unwrap(), gt.to_str().unwrap()]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let header: Vec<&str> = lines[0].split('\t').collect();
    let mut want_header = vec!["image"];
    want_header.extend(SCORERS);
    want_header.extend(["task", "all_correct"]);
    assert_eq!(header, want_header);
    for (line, path) in lines[1..].iter().zip([&out, &gt]) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), header.len(), "{line}");
        assert_eq!(cols[0], path.to_str().unwrap());
        let s = score(&read_png(path).unwrap().0, &p);
        for (i, name) in SCORERS.iter().enumerate() {
            assert_eq!(cols[1 + i], format!("{:.3}", s.get(name).unwrap()), "{name} in {line}");
        }
        assert_eq!(cols[6], format!("{:.3}", s.task()));
        assert_eq!(cols[7], s.all_correct().to_string());
    }
    assert!(lines[2].ends_with("\t1.000\ttrue"), "ground truth: {}", lines[2]);
    // A non-32x32 image is refused with its size.
    let big = dir.join("big.png");
    write_png(&big, &RgbImage { width: 8, height: 4, data: vec![200; 8 * 4 * 3] }, None).unwrap();
    let (ok, _, err) = vipo(&["world", "score", prompt, big.to_str().unwrap()]);
    assert!(!ok && err.contains("8x4"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `models/README.md` lists the sha256 of each shipped weights file as `<hex>  <path>`.
#[test]
fn shipped_weights_checksums_are_in_the_readme() {
    let readme = std::fs::read_to_string(root().join("models/README.md")).unwrap();
    for rel in ["models/world/unet/diffusion_pytorch_model.safetensors", "models/world/text_encoder/model.safetensors"]
    {
        let out = match Command::new("sha256sum").arg(root().join(rel)).output() {
            Ok(o) if o.status.success() => o,
            _ => {
                eprintln!("sha256sum is not available: the checksum of {rel} is not checked here (CI checks it)");
                return;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = text.split_whitespace().next().unwrap().to_ascii_lowercase();
        assert_eq!(hex.len(), 64, "{text}");
        let listed = readme.lines().any(|l| l.find(&hex).is_some_and(|i| l[i + hex.len()..].contains(rel)));
        assert!(listed, "models/README.md has no line with the sha256 {hex} followed by {rel}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Preference sets

/// Reads a written pairs.jsonl: one JSON object per line.
fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Scores of one side (0 chosen, 1 rejected) of a written pair, by scorer name.
fn side(line: &Value, k: usize) -> BTreeMap<String, f64> {
    line["scores"].as_object().unwrap().iter().map(|(n, v)| (n.clone(), v[k].as_f64().unwrap())).collect()
}

/// Hand-made candidates: for each prompt, ground-truth renders of it and of prompts that differ
/// in one attribute, and a corrupted one, each scored against the prompt (so the scorers
/// disagree about which is better in places, as the aesthetic is contrarian).
fn hand_candidates(prompts: &[Prompt]) -> Vec<Candidate> {
    let mut rng = Rng::new(31);
    let mut out = Vec::new();
    for p in prompts {
        let mut variants = vec![*p, *p];
        let mut q = *p;
        q.count = if p.count == 1 { 4 } else { 1 };
        variants.push(q);
        variants.push(Prompt { colour: other(&COLOURS, p.colour, &mut rng), ..*p });
        variants.push(Prompt { shape: other(&SHAPES, p.shape, &mut rng), ..*p });
        variants.push(Prompt { position: None, ..*p });
        for (k, v) in variants.iter().enumerate() {
            let seed = rng.next_u64();
            let mut image = render(v, seed);
            if k == 1 {
                image = corrupt(&image, seed);
            }
            let scores = score(&image, p);
            out.push(Candidate { prompt: *p, seed, image, scores });
        }
    }
    out
}

/// Checks a written set against the regime's rules, re-scoring the written PNGs; returns the
/// lines.
fn check_written(set: &prefs::PrefSet, regime: Regime, dir: &Path) -> Vec<Value> {
    let path = prefs::write(set, dir).unwrap();
    assert_eq!(path, dir.join("pairs.jsonl"));
    let lines = jsonl(&path);
    assert_eq!(lines.len(), set.pairs.len());
    assert!(!lines.is_empty(), "{regime:?}: no pairs");
    for (line, rec) in lines.iter().zip(&set.pairs) {
        let p = Prompt::parse(line["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(p, rec.prompt);
        let (c, r) = (side(line, 0), side(line, 1));
        // The written scores are the scores of the written images (PNG is lossless).
        for (k, scores) in [(0, &c), (1, &r)] {
            let file = dir.join(line[["chosen", "rejected"][k]].as_str().unwrap());
            let s = score(&read_png(&file).unwrap().0, &p);
            let want: BTreeMap<String, f64> = SCORERS.iter().filter_map(|n| Some((n.to_string(), s.get(n)?))).collect();
            // serde_json's float parsing may be 1 ulp off the written shortest form: 1e-12.
            assert_eq!(scores.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{line}");
            assert!(
                scores.iter().all(|(n, v)| (v - want[n]).abs() < 1e-12),
                "{line}: written {scores:?}, images {want:?}"
            );
        }
        let pref = |n: &str| c[n] - r[n];
        let category = line["category"].as_str().unwrap();
        match regime {
            Regime::Clean => {
                assert_eq!(category, "clean");
                // The task scorers decide; the contrarian is not asked.
                let task = || c.keys().filter(|n| TASK_SCORERS.contains(&n.as_str()));
                assert!(task().all(|n| pref(n) >= -1e-6), "a task scorer prefers the rejected image: {line}");
                assert!(task().any(|n| pref(n) > 1e-6), "no task scorer prefers the chosen image: {line}");
            }
            Regime::Noisy => {
                assert!(SCORERS.contains(&category), "{line}");
                assert!(pref(category) > 1e-6, "the labelling scorer does not prefer the chosen: {line}");
            }
            Regime::Trivial => {
                assert_eq!(category, "trivial");
                for n in TASK_SCORERS.iter().filter(|n| c.contains_key(**n)) {
                    assert_eq!(c[*n], 1.0, "trivial chosen is not all correct: {line}");
                }
                assert!(TASK_SCORERS.iter().any(|n| c.contains_key(*n) && r[*n] < 1.0), "{line}");
            }
        }
    }
    // The trainer's reader loads it: every image resolves, prompts and categories come along.
    let src = DataSource::detect(&path, None).unwrap();
    let mut stream = PairStream::open(&src, &StreamOptions::default()).unwrap();
    let pairs: Vec<_> = stream.by_ref().map(|p| p.unwrap()).collect();
    assert_eq!(stream.counts().missing_image, 0);
    assert_eq!(pairs.len(), lines.len());
    for (pair, line) in pairs.iter().zip(&lines) {
        assert_eq!(pair.prompt, line["prompt"].as_str().unwrap());
        assert_eq!(pair.category_name(), line["category"].as_str().unwrap());
        match &pair.chosen {
            ImageSource::File(f) => assert!(f.is_file(), "{}", f.display()),
            ImageSource::Bytes(_) => panic!("a manifest pair holds files"),
        }
    }
    lines
}

/// All pairs within a prompt on which every task scorer votes the same way (or abstains), at
/// least one not abstaining: what the clean regime must keep, worked out independently.
fn unanimous_pairs(cands: &[Candidate], min_gap: f64) -> usize {
    let mut n = 0;
    for (i, a) in cands.iter().enumerate() {
        for b in &cands[i + 1..] {
            if a.prompt != b.prompt {
                continue;
            }
            let d: Vec<f64> = TASK_SCORERS.iter().filter_map(|s| Some(a.scores.get(s)? - b.scores.get(s)?)).collect();
            let pos = d.iter().any(|&x| x > 1e-6);
            let neg = d.iter().any(|&x| x < -1e-6);
            let widest = d.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            n += (pos != neg && widest >= min_gap) as usize;
        }
    }
    n
}

#[test]
fn preference_sets_follow_their_regimes() {
    let dir = tmp("prefs");
    // Eight distinct prompts spread over the grammar.
    let prompts: Vec<Prompt> = Prompt::all().into_iter().step_by(31).collect();
    assert_eq!(prompts.iter().collect::<BTreeSet<_>>().len(), 8);
    let cands = hand_candidates(&prompts);
    let groups = prompts.len();
    let per = cands.len() / groups;
    let all_pairs = groups * per * (per - 1) / 2;

    let clean = build(&cands, Regime::Clean, 0, 0.0);
    assert_eq!(clean.considered, all_pairs);
    assert_eq!(clean.pairs.len(), unanimous_pairs(&cands, 0.0));
    check_written(&clean, Regime::Clean, &dir.join("clean"));

    // A minimum gap keeps the decisive clean pairs only: fewer, but not none, and each one has a
    // task scorer preferring its winner by the gap.
    let mut kept = vec![];
    for gap in [0.5, 0.75, 1.0] {
        let decisive = build(&cands, Regime::Clean, 0, gap);
        assert_eq!(decisive.pairs.len(), unanimous_pairs(&cands, gap), "gap {gap}");
        kept.push(decisive.pairs.len());
        for p in &decisive.pairs {
            let widest =
                TASK_SCORERS.iter().filter_map(|n| p.scores.get(*n)).map(|s| s[0] - s[1]).fold(f64::MIN, f64::max);
            assert!(widest >= gap, "{:?}", p.scores);
        }
        // Noisy labels are not filtered by the gap.
        let pairs = |set: &prefs::PrefSet| set.pairs.iter().map(|p| (p.chosen, p.rejected)).collect::<Vec<_>>();
        assert_eq!(pairs(&build(&cands, Regime::Noisy, 0, gap)), pairs(&build(&cands, Regime::Noisy, 0, 0.0)));
    }
    assert!(kept.windows(2).all(|w| w[0] >= w[1]), "{kept:?}");
    assert!(kept[2] > 0 && kept[2] < clean.pairs.len(), "{kept:?} of {} clean pairs", clean.pairs.len());

    let noisy = build(&cands, Regime::Noisy, 0, 0.0);
    assert_eq!(noisy.considered, all_pairs);
    let noisy_lines = check_written(&noisy, Regime::Noisy, &dir.join("noisy"));
    // Conflicts: some noisy pairs have a scorer preferring the rejected image.
    let conflicts = noisy_lines
        .iter()
        .filter(|l| {
            let (c, r) = (side(l, 0), side(l, 1));
            c.keys().any(|n| c[n] - r[n] < -1e-6)
        })
        .count();
    assert!(conflicts > 0, "no conflicting pair among {} noisy pairs", noisy_lines.len());
    let categories: BTreeSet<&str> = noisy_lines.iter().map(|l| l["category"].as_str().unwrap()).collect();
    assert!(categories.len() >= 3, "noisy labels come from few scorers: {categories:?}");

    let trivial = build(&cands, Regime::Trivial, 0, 0.0);
    assert_eq!(trivial.pairs.len(), groups);
    check_written(&trivial, Regime::Trivial, &dir.join("trivial"));

    // `vipo data agree`: no task scorer disagrees with a clean label (the contrarian may), and
    // the noisy set has conflicts.
    for (name, want_all) in [("clean", true), ("noisy", false)] {
        let path = dir.join(name).join("pairs.jsonl");
        let (ok, out, err) = vipo(&["data", "agree", path.to_str().unwrap(), "--json"]);
        assert!(ok, "{err}");
        let j: Value = serde_json::from_str(&out).unwrap();
        let rate = j["agreement_rate"].as_f64().unwrap();
        assert_eq!(j["several_scores"].as_u64().unwrap() as usize, jsonl(&path).len(), "{out}");
        if want_all {
            assert!(rate <= 1.0, "{out}");
            for n in TASK_SCORERS {
                if let Some(d) = j["per_scorer"][n]["disagree"].as_u64() {
                    assert_eq!(d, 0, "{n} disagrees with a clean label: {out}");
                }
            }
            assert!(j["per_scorer"]["count"]["disagree"].is_u64(), "{out}");
        } else {
            assert!(rate < 1.0, "{out}");
            let a = agreement(&path, DEFAULT_TIE_TOL).unwrap();
            assert_eq!(a.vetoed as usize, conflicts, "{out}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same rules on the shipped model's own samples (what the demo builds).
#[test]
fn preference_sets_from_shipped_model_samples() {
    let dir = tmp("prefs-model");
    let sd = StableDiffusion::from_dir(shipped(), &Device::Cpu, None).unwrap();
    let prompts = vipo::world::demo::train_prompts(4, 3);
    let settings = SampleSettings { steps: 4, guidance: 3.0, batch: 16 };
    let mut calls = 0;
    let cands = prefs::candidates(&sd, &prompts, 4, 3, &settings, &mut |_| calls += 1).unwrap();
    assert_eq!(cands.len(), 16);
    assert!(calls >= 1);
    for (i, c) in cands.iter().enumerate() {
        assert_eq!(c.prompt, prompts[i / 4]);
        assert_eq!(c.seed, prefs::job_seed(3, i / 4, i % 4));
        assert_eq!((c.image.width, c.image.height), (SIZE, SIZE));
        assert_eq!(c.scores, score(&c.image, &c.prompt));
    }
    let seeds: BTreeSet<u64> = cands.iter().map(|c| c.seed).collect();
    assert_eq!(seeds.len(), cands.len(), "job seeds repeat");
    for regime in [Regime::Clean, Regime::Noisy, Regime::Trivial] {
        let set = build(&cands, regime, 0, 0.0);
        if regime == Regime::Clean {
            assert_eq!(set.pairs.len(), unanimous_pairs(&cands, 0.0));
        }
        if regime != Regime::Trivial && set.pairs.is_empty() {
            eprintln!("{regime:?}: the model's samples gave no pair (scores all tied)");
            continue;
        }
        check_written(&set, regime, &dir.join(regime.name()));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 6. Batch independence of sampling

/// A job's image does not depend on what else is in its batch. Tolerance: at most 1 level per
/// channel. Each image's start noise comes from its own seed and DDIM (eta 0) draws nothing
/// else, but the CPU kernels may block a batch of 3 differently from a batch of 1, which
/// reorders float sums (~1e-7 relative) and can move a value across a rounding boundary when it
/// is quantized to bytes; anything that mixes samples (another job's noise or prompt) moves
/// pixels by far more than 1 level.
#[test]
fn sampled_images_do_not_depend_on_their_batch() {
    let sd = StableDiffusion::from_dir(shipped(), &Device::Cpu, None).unwrap();
    let jobs: Vec<(Prompt, u64)> =
        ["three green circles", "one yellow triangle at the bottom", "two red squares on the left"]
            .iter()
            .zip([11u64, 22, 33])
            .map(|(t, s)| (Prompt::parse(t).unwrap(), s))
            .collect();
    let run = |batch: usize, jobs: &[(Prompt, u64)]| {
        let settings = SampleSettings { steps: 4, guidance: 3.0, batch };
        let mut seen = Vec::new();
        let imgs = sample_images(&sd, jobs, &settings, &mut |n| seen.push(n)).unwrap();
        assert_eq!(*seen.last().unwrap(), jobs.len());
        imgs
    };
    let together = run(3, &jobs);
    let pairs = run(2, &jobs); // chunks of 2 and 1
    assert_eq!(together.len(), 3);
    let mut exact = 0;
    for (i, job) in jobs.iter().enumerate() {
        let alone = run(1, std::slice::from_ref(job)).remove(0);
        for (name, img) in [("batch of 3", &together[i]), ("batch of 2", &pairs[i])] {
            let max = alone.data.iter().zip(&img.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(max <= 1, "job {i} ({}): {name} differs from alone by {max} levels", job.0.text());
            exact += (alone == *img) as usize;
            let differing = alone.data.iter().zip(&img.data).filter(|(a, b)| a != b).count();
            eprintln!("job {i}, {name}: {differing} of {} bytes differ from alone (max {max})", img.data.len());
        }
        assert!(alone.data.iter().any(|&v| v != alone.data[0]), "job {i}: a flat image");
    }
    eprintln!("{exact} of 6 batched images equal their unbatched image byte for byte");
    // The comparison is not vacuous: different jobs give different images.
    assert!(together[0] != together[1] && together[1] != together[2] && together[0] != together[2]);
}

// ---------------------------------------------------------------------------------------------
// 7. The demo, end to end (what CI runs)

#[test]
fn quick_demo_end_to_end() {
    let out = tmp("demo");
    let t0 = Instant::now();
    let (ok, stdout, err) = vipo(&["--device", "cpu", "demo", "--quick", "--out", out.to_str().unwrap()]);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("vipo demo --quick took {secs:.1} s");
    assert!(ok, "demo failed:\n{stdout}\n{err}");

    let quick = DemoOptions::default().quick();
    let held: Vec<Prompt> = Prompt::all().into_iter().filter(Prompt::is_held_out).collect();
    let n_eval = held.len() * quick.eval_seeds;
    let n_pos = held.iter().filter(|p| p.position.is_some()).count() * quick.eval_seeds;

    // report.json: the table, finite, in [0, 1], over the held-out images.
    let report = json_file(&out.join("report.json"));
    assert_eq!(report["eval_images"].as_u64().unwrap() as usize, n_eval);
    assert_eq!(report["candidates"].as_u64().unwrap() as usize, quick.train_prompts * quick.per_prompt);
    assert_eq!(report["steps"].as_u64().unwrap(), quick.steps);
    assert_eq!(report["regime"], "clean");
    assert_eq!(report["finetune"], "lora");
    assert_eq!(report["min_gap"].as_f64(), Some(quick.min_gap));
    // serde writes the f32 by its shortest decimal ("0.003").
    assert_eq!(report["lr"].as_f64().map(|v| v as f32), Some(quick.lr));
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["metric"].as_str().unwrap()).collect();
    assert_eq!(names, ["task", "all_correct", "count", "colour", "shape", "position", "aesthetic"]);
    assert_eq!(names, metric_names());
    for r in rows {
        let m = r["metric"].as_str().unwrap();
        for k in ["before", "after"] {
            let mean = r[k]["mean"].as_f64().unwrap_or(f64::NAN);
            assert!(mean.is_finite() && (0.0..=1.0).contains(&mean), "{m} {k}: {r}");
            assert!(r[k]["ci95"].as_f64().is_some_and(f64::is_finite), "{m} {k}: {r}");
            let n = if m == "position" { n_pos } else { n_eval };
            assert_eq!(r[k]["n"].as_u64().unwrap() as usize, n, "{m} {k}");
        }
        let change = r["change"]["mean"].as_f64().unwrap();
        let diff = r["after"]["mean"].as_f64().unwrap() - r["before"]["mean"].as_f64().unwrap();
        assert!((change - diff).abs() < 1e-9, "{m}: paired change {change} vs {diff}");
    }
    // Every listed file exists.
    for f in report["files"].as_array().unwrap() {
        let p = PathBuf::from(f.as_str().unwrap());
        let p = if p.is_absolute() { p } else { root().join(p) };
        assert!(p.exists(), "{}", p.display());
    }

    // report.md and stdout carry the table.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for text in [&md, &stdout] {
        assert!(text.contains("| metric | before (95% CI) |"), "{text}");
        for m in &names {
            assert!(text.contains(&format!("| {m} | ")), "{m} missing:\n{text}");
        }
    }

    // samples.png: the grid compose() makes of up to 24 held-out prompts, as two blocks of
    // (ground truth | before | after) per row, upscaled 3x with gaps of 4.
    let (grid, _) = read_png(&out.join("samples.png")).unwrap();
    let jobs = eval_jobs(quick.eval_seeds, quick.seed);
    let firsts: Vec<(Prompt, u64)> = {
        let mut seen = BTreeSet::new();
        jobs.iter().filter(|(p, _)| seen.insert(*p)).take(24).copied().collect()
    };
    let half = firsts.len().div_ceil(2);
    let blank = RgbImage { width: SIZE, height: SIZE, data: vec![0; SIZE * SIZE * 3] };
    let layout_rows: Vec<Vec<RgbImage>> =
        (0..half).map(|r| vec![blank.clone(); if r + half < firsts.len() { 6 } else { 3 }]).collect();
    let want = compose(&layout_rows, 3, 4, &[2]);
    assert_eq!((grid.width, grid.height), (want.width, want.height));
    // Its first cell is the ground truth of the first held-out prompt's first seed, 3x.
    let gt = upscale(&render(&firsts[0].0, firsts[0].1), 3);
    for y in 0..gt.height {
        let row = &grid.data[((4 + y) * grid.width + 4) * 3..((4 + y) * grid.width + 4 + gt.width) * 3];
        assert_eq!(row, &gt.data[y * gt.width * 3..(y + 1) * gt.width * 3], "samples.png row {y}");
    }

    // curves.png: two 720x300 charts (loss, accuracy) one above the other, each with a raw
    // (light grey) and a smoothed (palette) series.
    let (curves, _) = read_png(&out.join("curves.png")).unwrap();
    assert_eq!((curves.width, curves.height), (720, 600));
    for (half, c) in [(0..300, colour(0)), (300..600, colour(1))] {
        let n =
            half.clone().flat_map(|y| (0..720).map(move |x| (x, y))).filter(|&(x, y)| px(&curves, x, y) == c).count();
        assert!(n > 100, "chart rows {half:?}: {n} pixels of its smoothed series");
    }

    // The preference set and the checkpoint.
    let pairs = jsonl(&out.join("data/pairs.jsonl"));
    assert!(!pairs.is_empty());
    assert!(pairs.iter().all(|l| l["category"] == "clean"));
    let checkpoints: Vec<PathBuf> = std::fs::read_dir(out.join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert!(std::fs::read_dir(&checkpoints[0]).unwrap().count() > 0);
    let _ = std::fs::remove_dir_all(&out);
}

// ---------------------------------------------------------------------------------------------
// 8. Statistics of the report

#[test]
fn estimate_matches_hand_computation() {
    // [0.2, 0.5, 0.9, 0.4, 1.0]: mean 3.0 / 5 = 0.6; squared deviations 0.16 + 0.01 + 0.09 +
    // 0.04 + 0.16 = 0.46; sample variance 0.46 / 4 = 0.115; standard error sqrt(0.115 / 5) =
    // sqrt(0.023) = 0.15165750888103102; ci95 = 1.96 x that = 0.2972487174068208.
    let e = estimate(&[0.2, 0.5, 0.9, 0.4, 1.0]);
    assert_eq!(e.n, 5);
    assert!((e.mean - 0.6).abs() < 1e-12, "{e:?}");
    assert!((e.ci95 - 0.2972487174068208).abs() < 1e-12, "{e:?}");
    // One value: no spread to estimate; none: no mean.
    assert_eq!(estimate(&[0.7]), Estimate { mean: 0.7, ci95: 0.0, n: 1 });
    let empty = estimate(&[]);
    assert!(empty.mean.is_nan() && empty.n == 0);
}

fn scores(count: f64, colour: f64, shape: f64, position: Option<f64>, aesthetic: f64) -> Scores {
    Scores { count, colour, shape, position, aesthetic }
}

/// `compare` pairs before and after by job: the change's interval is that of the per-job
/// differences, not of the two means.
#[test]
fn compare_pairs_by_job() {
    let p = |t: &str| Prompt::parse(t).unwrap();
    let jobs = vec![
        (p("one red circle on the left"), 1),
        (p("two blue squares at the top"), 2),
        (p("three green triangles"), 3),
        (p("four yellow circles"), 4),
    ];
    let before = vec![
        scores(0.5, 1.0, 1.0, Some(0.0), 0.2),
        scores(1.0, 1.0, 1.0, Some(1.0), 0.4),
        scores(0.25, 0.5, 1.0, None, 0.6),
        scores(1.0, 1.0, 1.0, None, 0.8),
    ];
    let after = vec![
        scores(1.0, 1.0, 1.0, Some(1.0), 0.3),
        scores(1.0, 1.0, 1.0, Some(0.5), 0.5),
        scores(0.5, 1.0, 1.0, None, 0.7),
        scores(0.5, 1.0, 1.0, None, 0.9),
    ];
    let blank = RgbImage { width: 1, height: 1, data: vec![0; 3] };
    let ev = |s: Vec<Scores>| Eval { jobs: jobs.clone(), images: vec![blank.clone(); 4], scores: s };
    let rows = compare(&ev(before), &ev(after));
    assert_eq!(rows.iter().map(|r| r.metric.as_str()).collect::<Vec<_>>(), metric_names());
    let row = |m: &str| rows.iter().find(|r| r.metric == m).unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;

    // aesthetic: every job +0.1, so the paired change is 0.1 with no spread, while the
    // before/after values themselves spread (0.2..0.8): pairing is what makes it significant.
    let a = row("aesthetic");
    assert!(close(a.change.mean, 0.1) && a.change.ci95 < 1e-12, "{a:?}");
    assert!(a.before.ci95 > 0.2 && a.significant(), "{a:?}");
    assert!(close(a.before.mean, 0.5) && close(a.after.mean, 0.6));

    // count: changes [+0.5, 0, +0.25, -0.5] -> estimate of exactly those.
    let c = row("count");
    assert_eq!(c.change, estimate(&[0.5, 0.0, 0.25, -0.5]));
    assert!(close(c.change.mean, 0.0625) && !c.significant(), "{c:?}");

    // position: only the two jobs whose prompts name a place.
    let pos = row("position");
    assert_eq!((pos.before.n, pos.after.n, pos.change.n), (2, 2, 2));
    assert_eq!(pos.change, estimate(&[1.0, -0.5]));

    // task: job 0 before (0.5 + 1 + 1 + 0) / 4 = 0.625, after 1; job 1 1 -> (3 + 0.5) / 4 = 0.875;
    // job 2 (0.25 + 0.5 + 1) / 3 = 0.5833.. -> (0.5 + 1 + 1) / 3 = 0.8333..; job 3 1 -> 2.5 / 3.
    let t = row("task");
    let want = estimate(&[0.375, -0.125, 2.5 / 3.0 - 1.75 / 3.0, 2.5 / 3.0 - 1.0]);
    assert!(close(t.change.mean, want.mean) && close(t.change.ci95, want.ci95) && t.change.n == 4, "{t:?}");
    assert!(close(t.before.mean, (0.625 + 1.0 + 1.75 / 3.0 + 1.0) / 4.0), "{t:?}");
    // all_correct: before jobs 1 and 3, after job 0 only.
    let ac = row("all_correct");
    assert!(close(ac.before.mean, 0.5) && close(ac.after.mean, 0.25), "{ac:?}");
    assert_eq!(ac.change, estimate(&[1.0, -1.0, 0.0, -1.0]));
}

// ---------------------------------------------------------------------------------------------
// 9. Plot helpers

fn px(img: &RgbImage, x: usize, y: usize) -> [u8; 3] {
    let i = (y * img.width + x) * 3;
    [img.data[i], img.data[i + 1], img.data[i + 2]]
}

/// The (x, y) of every pixel of colour `c`.
fn pixels_of(img: &RgbImage, c: [u8; 3]) -> Vec<(usize, usize)> {
    (0..img.height).flat_map(|y| (0..img.width).map(move |x| (x, y))).filter(|&(x, y)| px(img, x, y) == c).collect()
}

#[test]
fn line_chart_draws_each_series_and_names_it() {
    let (a, b, c) = ([0x12, 0x34, 0x56], [0xab, 0x20, 0xef], [0x00, 0xff, 0x00]);
    let mut series = vec![
        Series {
            name: "loss (raw)".into(),
            points: vec![(1.0, 0.9), (2.0, 0.7), (3.0, 0.4)],
            colour: a,
            markers: false,
        },
        Series {
            name: "mean ± smooth".into(),
            points: vec![(1.0, 0.8), (2.0, f64::NAN), (3.0, 0.5), (4.0, 0.45)],
            colour: b,
            markers: true,
        },
        Series { name: "accuracy".into(), points: vec![(0.5, 0.1), (4.5, 1.2)], colour: c, markers: false },
    ];
    let (w, h) = (640, 360);
    let img = line_chart("Title", "step", "value", &series, Some(0.5), (w, h));
    assert_eq!((img.width, img.height, img.data.len()), (w, h, w * h * 3));
    let white = pixels_of(&img, [255, 255, 255]).len();
    assert!(white > w * h / 2, "mostly white background: {white}");
    // Every series is drawn, in the plot (left of the legend) and as a legend swatch.
    let legend_x = (0..w).rev().find(|&x| (0..h).any(|y| px(&img, x, y) == c)).unwrap();
    for s in &series {
        let p = pixels_of(&img, s.colour);
        let in_plot = p.iter().filter(|q| q.0 + 100 < legend_x).count();
        assert!(in_plot > 50, "{}: {in_plot} pixels in the plot", s.name);
        assert!(p.iter().any(|q| q.0 + 60 > legend_x), "{}: no legend swatch", s.name);
    }
    // The widest series spans the plot's width; y grows upwards: the first series falls, so
    // its leftmost pixels sit higher (smaller row) than its rightmost.
    let pc: Vec<(usize, usize)> = pixels_of(&img, c).into_iter().filter(|q| q.0 + 100 < legend_x).collect();
    let (cx0, cx1) = (pc.iter().map(|q| q.0).min().unwrap(), pc.iter().map(|q| q.0).max().unwrap());
    let pa: Vec<(usize, usize)> = pixels_of(&img, a).into_iter().filter(|q| q.0 + 100 < legend_x).collect();
    let (ax0, ax1) = (pa.iter().map(|q| q.0).min().unwrap(), pa.iter().map(|q| q.0).max().unwrap());
    assert!(cx0 < ax0 && cx1 > ax1, "x range: accuracy {cx0}..{cx1}, loss {ax0}..{ax1}");
    let row_at = |x: usize| pa.iter().filter(|q| q.0 == x).map(|q| q.1).min().unwrap();
    assert!(row_at(ax0) < row_at(ax1), "the falling series rises on the picture");
    // Text: ink in the title band and beside every legend swatch.
    let ink = pixels_of(&img, [0x11, 0x11, 0x11]);
    assert!(ink.iter().any(|q| q.1 < 25), "no title");
    assert!(ink.iter().filter(|q| q.0 > legend_x).count() > 3 * 20, "legend names");
    // The dashed reference line: grey pixels on a single row, between the rows of the loss
    // series at 0.7 (x = 2) and 0.4 (x = 3).
    let grey: Vec<(usize, usize)> = pixels_of(&img, [0x88, 0x88, 0x88]);
    assert!(grey.len() > 50 && grey.iter().all(|q| q.1 == grey[0].1), "{} reference pixels", grey.len());
    assert!(row_at(ax0) < grey[0].1 && grey[0].1 < row_at(ax1));
    // Markers add pixels to the series that has them.
    let with = pixels_of(&img, b).len();
    series[1].markers = false;
    let without = pixels_of(&line_chart("Title", "step", "value", &series, Some(0.5), (w, h)), b).len();
    assert!(with > without + 3 * 20, "markers: {with} vs {without} pixels");
    // Another size is honoured, and no series at all still draws the frame.
    let empty = line_chart("", "", "", &[], None, (300, 200));
    assert_eq!((empty.width, empty.height), (300, 200));
    assert!(!pixels_of(&empty, [0x33, 0x33, 0x33]).is_empty());
}

/// A w x h image whose every pixel is distinct (so a misplaced pixel is caught).
fn distinct_image(w: usize, h: usize, salt: u8) -> RgbImage {
    let data = (0..w * h)
        .flat_map(|i| [(i * 7) as u8 ^ salt, (i * 13 + 1) as u8, (i / 3) as u8 ^ salt.rotate_left(3)])
        .collect();
    RgbImage { width: w, height: h, data }
}

#[test]
fn upscale_repeats_pixels() {
    let img = distinct_image(3, 2, 5);
    assert_eq!(upscale(&img, 1), img);
    let k = 3;
    let big = upscale(&img, k);
    assert_eq!((big.width, big.height, big.data.len()), (9, 6, 9 * 6 * 3));
    for y in 0..big.height {
        for x in 0..big.width {
            let src = ((y / k) * img.width + x / k) * 3;
            let dst = (y * big.width + x) * 3;
            assert_eq!(big.data[dst..dst + 3], img.data[src..src + 3], "({x}, {y})");
        }
    }
}

#[test]
fn compose_places_cells_from_its_inputs() {
    let (w, h, scale, gap) = (5usize, 4usize, 2usize, 3usize);
    let rows = vec![
        vec![distinct_image(w, h, 1), distinct_image(w, h, 2), distinct_image(w, h, 3)],
        vec![distinct_image(w, h, 4)],
    ];
    let breaks = [0usize];
    let out = compose(&rows, scale, gap, &breaks);
    let (cw, ch) = (w * scale, h * scale);
    let cols = 3;
    // Column x: a gap before each cell, 3 more gaps after each break column (not after the last).
    let col_x: Vec<usize> =
        (0..cols).map(|c| gap + c * (cw + gap) + 3 * gap * breaks.iter().filter(|&&b| b < c).count()).collect();
    assert_eq!(out.width, col_x[cols - 1] + cw + gap);
    assert_eq!(out.height, rows.len() * (ch + gap) + gap);
    assert_eq!(out.data.len(), out.width * out.height * 3);
    let at = |x: usize, y: usize| &out.data[(y * out.width + x) * 3..(y * out.width + x) * 3 + 3];
    let mut covered = vec![false; out.width * out.height];
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let big = upscale(img, scale);
            let (x0, y0) = (col_x[c], gap + r * (ch + gap));
            for y in 0..ch {
                for x in 0..cw {
                    assert_eq!(at(x0 + x, y0 + y), &big.data[(y * cw + x) * 3..(y * cw + x) * 3 + 3], "cell {r},{c}");
                    covered[(y0 + y) * out.width + x0 + x] = true;
                }
            }
        }
    }
    // Everything else (gaps, the missing cells of the short row) is the dark background.
    let bg = at(0, 0).to_vec();
    assert!(bg.iter().all(|&v| v == bg[0]) && bg[0] < 100, "{bg:?}");
    for (i, c) in covered.iter().enumerate() {
        if !c {
            assert_eq!(at(i % out.width, i / out.width), &bg[..], "pixel {i}");
        }
    }
}

/// `world pretrain` (what made the shipped model) on a few tiny steps: finite losses, a folder
/// that loads as a pipeline, `--resume` starting from the written weights and moving them, and
/// a caption-noise rate out of 0..1 refused by name.
#[test]
fn pretrain_writes_a_loadable_pipeline_and_resumes() {
    let dir = tmp("pretrain");
    let out = dir.join("world");
    let opts = wmodel::PretrainOptions {
        out: out.clone(),
        steps: 2,
        batch: 2,
        save_every: 1,
        caption_noise: 0.5,
        ..Default::default()
    };
    let mut losses = vec![];
    wmodel::pretrain(&opts, &Device::Cpu, &mut |s| losses.push((s.step, s.loss))).unwrap();
    assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2]);
    assert!(losses.iter().all(|l| l.1.is_finite() && l.1 > 0.0), "{losses:?}");
    let unet_file = out.join("unet/diffusion_pytorch_model.safetensors");
    let first = std::fs::read(&unet_file).unwrap();
    let sd = StableDiffusion::from_dir(&out, &Device::Cpu, None).unwrap();
    assert!(sd.vae.is_none());

    // Resume: loads the written folder and writes new weights over it.
    let mut resumed = vec![];
    let again = wmodel::PretrainOptions { steps: 1, resume: true, caption_noise: 0.0, ..opts.clone() };
    wmodel::pretrain(&again, &Device::Cpu, &mut |s| resumed.push(s.loss)).unwrap();
    assert_eq!(resumed.len(), 1);
    assert_ne!(std::fs::read(&unet_file).unwrap(), first, "resume did not write new weights");
    assert!(resumed[0].is_finite());

    for bad in [-0.1f32, 1.5] {
        let o = wmodel::PretrainOptions { caption_noise: bad, ..opts.clone() };
        let err = wmodel::pretrain(&o, &Device::Cpu, &mut |_| {}).expect_err("bad caption noise").to_string();
        assert!(err.contains("--caption-noise"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `demo --sweep` in a folder where a run already finished reads that run back instead of
/// training it again (a planted result comes out unchanged in `sweep.json`), and refuses a
/// run file that belongs to another cell, naming it.
#[test]
fn sweep_reuses_finished_runs() {
    use vipo::world::demo::{run_sweep, Silent, SweepRun};
    let dir = tmp("sweep-resume");
    let o = DemoOptions { model: shipped(), out: dir.clone(), ..DemoOptions::default() }.quick();
    let run_dir = dir.join("runs").join("clean-alpha+0.5-seed3");
    std::fs::create_dir_all(&run_dir).unwrap();
    let planted = Estimate { mean: 0.4321, ci95: 0.01, n: 7 };
    let row = |m: &str| vipo::world::demo::Row { metric: m.into(), before: planted, after: planted, change: planted };
    let run = SweepRun {
        regime: Regime::Clean,
        alpha: 0.5,
        seed: 3,
        pairs: 99,
        final_implicit_acc: Some(0.77),
        rows: ["task", "all_correct", "aesthetic"].iter().map(|m| row(m)).collect(),
    };
    std::fs::write(run_dir.join("run.json"), serde_json::to_string(&run).unwrap()).unwrap();
    let t0 = Instant::now();
    let report = run_sweep(&o, &[Regime::Clean], &[0.5], &[3], &Device::Cpu, &mut Silent).unwrap();
    eprintln!("resumed sweep took {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(report.runs.len(), 1);
    assert_eq!(report.runs[0].final_implicit_acc, Some(0.77));
    assert_eq!(report.cells[0].task_change.mean, 0.4321);
    for f in ["metrics.jsonl", "config.toml"] {
        assert!(!run_dir.join(f).exists(), "the finished run was trained again (it wrote {f})");
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["runs"][0]["pairs"], 99);

    // A run file of another cell in this cell's folder is an error naming the file.
    let wrong = SweepRun { alpha: 1.0, ..run };
    std::fs::write(run_dir.join("run.json"), serde_json::to_string(&wrong).unwrap()).unwrap();
    let err = run_sweep(&o, &[Regime::Clean], &[0.5], &[3], &Device::Cpu, &mut Silent).unwrap_err().to_string();
    assert!(err.contains("run.json") && err.contains("alpha 1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
