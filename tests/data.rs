//! Preference data against `../shared/fixtures/pickapic_tiny/` (`expected.json`: the counts and
//! per-row verdicts a correct loader reports), resume cursors, image preprocessing against
//! values computed here, seeded augmentation, the `vipo data stats` CLI, category sampling, and
//! the latent cache round trip with the tiny SD VAE.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use vipo::data::cache::{self, BuildOptions, CacheKey, LatentCache};
use vipo::data::image::{decode, decode_source, preprocess, resize_crop, resized_size, Crop, Resample};
use vipo::data::{
    parse_category_weights, CategorySampler, Cursor, DataSource, ImageSource, LoaderOptions, PairLoader, PairStream,
    PreferencePair, StreamOptions, Verdict,
};
use vipo::image_io::{write_png, RgbImage};
use vipo::models::autoencoder_kl::AutoencoderKL;
use vipo::{Device, Tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/pickapic_tiny")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn parquet_source() -> DataSource {
    DataSource::detect(&fixture().join("data"), None).unwrap()
}

fn jsonl_source() -> DataSource {
    DataSource::detect(&fixture().join("pairs.jsonl"), None).unwrap()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo-data-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn decoded_wh(src: &ImageSource) -> Option<(usize, usize)> {
    decode_source(src).ok().map(|i| (i.width, i.height))
}

fn wh(v: &Value) -> Option<(usize, usize)> {
    v.as_array().map(|a| (a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize))
}

fn center(size: usize) -> LoaderOptions {
    LoaderOptions { size, resample: Resample::Bilinear, crop: Crop::Center, flip: false, seed: 0 }
}

/// Every parquet row's verdict, winner, caption, position and image sizes, as expected.json.
#[test]
fn parquet_rows_match_expected() {
    let exp = expected();
    let rows = exp["parquet"]["per_row"].as_array().unwrap();
    let mut stream = PairStream::open(&parquet_source(), &StreamOptions::default()).unwrap();
    let mut n = 0;
    while let Some(rec) = stream.next_record() {
        let rec = rec.unwrap();
        let want = &rows[n];
        assert_eq!(rec.index, u(&want["row"]), "row {n}");
        let file = Path::new(want["file"].as_str().unwrap()).file_name().unwrap().to_str().unwrap();
        match &rec.cursor {
            Cursor::Parquet { file: f, row, .. } => {
                assert_eq!((f.as_str(), *row), (file, u(&want["row_in_file"])), "row {n}")
            }
            c => panic!("row {n}: cursor {c:?}"),
        }
        let status = match rec.verdict {
            Verdict::NoLabel => "no_label",
            Verdict::Tie => "tie",
            Verdict::Pair => {
                let p = rec.pair.as_ref().unwrap();
                if decoded_wh(&p.chosen).is_some() && decoded_wh(&p.rejected).is_some() {
                    "usable"
                } else {
                    "corrupt"
                }
            }
            v => panic!("row {n}: unexpected verdict {v:?}"),
        };
        assert_eq!(status, want["status"].as_str().unwrap(), "row {n}");
        if status == "usable" {
            assert_eq!(rec.chosen_column.map(u64::from), want["chosen"].as_u64(), "row {n}");
        }
        if let Some(p) = &rec.pair {
            assert_eq!(p.prompt, want["caption"].as_str().unwrap(), "row {n}");
            assert_eq!(p.tie, status == "tie");
            // Back from chosen / rejected to jpg_0 / jpg_1.
            let (s0, s1) = match rec.chosen_column {
                Some(1) => (&p.rejected, &p.chosen),
                _ => (&p.chosen, &p.rejected),
            };
            assert_eq!(decoded_wh(s0), wh(&want["jpg_0_size_wh"]), "row {n} jpg_0");
            assert_eq!(decoded_wh(s1), wh(&want["jpg_1_size_wh"]), "row {n} jpg_1");
        }
        n += 1;
    }
    assert_eq!(n as u64, u(&exp["parquet"]["rows"]));
    let c = stream.counts();
    assert_eq!(c.rows, 24);
    assert_eq!(c.ties, u(&exp["parquet"]["ties_dropped"]));
    assert_eq!(c.no_label, u(&exp["parquet"]["no_label_skipped"]));
}

/// The stream + loader give the expected totals, dropping or keeping ties.
#[test]
fn parquet_counts_match_expected() {
    let exp = &expected()["parquet"];
    for keep_ties in [false, true] {
        let stream = PairStream::open(&parquet_source(), &StreamOptions { keep_ties }).unwrap();
        let mut loader = PairLoader::new(stream, center(32)).unwrap();
        let pairs: Vec<_> = loader.by_ref().map(|p| p.unwrap()).collect();
        let want = if keep_ties { &exp["usable_pairs_keep_ties"] } else { &exp["usable_pairs"] };
        assert_eq!(pairs.len() as u64, u(want), "keep_ties {keep_ties}");
        assert_eq!(pairs.iter().filter(|p| p.pair.tie).count(), if keep_ties { 3 } else { 0 });
        assert_eq!(loader.counts().undecodable_pairs, u(&exp["corrupt_skipped"]));
        assert_eq!(loader.counts().undecodable_images, 1);
        let c = loader.source().counts();
        assert_eq!(c.rows, u(&exp["rows"]));
        assert_eq!(c.ties, u(&exp["ties_dropped"]));
        assert_eq!(c.no_label, u(&exp["no_label_skipped"]));
        assert_eq!(c.bad_label + c.missing_image, 0);
        // The repeated caption is two pairs, not one.
        let cabin = "a cozy cabin in a snowy forest at night, warm light in the windows";
        assert_eq!(pairs.iter().filter(|p| p.pair.prompt == cabin).count(), 2);
    }
}

#[test]
fn jsonl_counts_match_expected() {
    let exp = &expected()["jsonl"];
    let mut stream = PairStream::open(&jsonl_source(), &StreamOptions::default()).unwrap();
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0;
    while let Some(rec) = stream.next_record() {
        let rec = rec.unwrap();
        let want = &exp["per_line"][n];
        assert_eq!(rec.index + 1, u(&want["line"]));
        assert_eq!(rec.category.as_deref(), want["category"].as_str(), "line {}", rec.index + 1);
        let status = if rec.verdict == Verdict::Pair { "usable" } else { "missing" };
        assert_eq!(status, want["status"].as_str().unwrap());
        *lines.entry(rec.category.unwrap_or_else(|| "(none)".into())).or_insert(0) += 1;
        n += 1;
    }
    assert_eq!(n as u64, u(&exp["lines"]));
    let want_lines: BTreeMap<String, u64> =
        exp["per_category_lines"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), u(v))).collect();
    assert_eq!(lines, want_lines);

    let stream = PairStream::open(&jsonl_source(), &StreamOptions::default()).unwrap();
    let mut loader = PairLoader::new(stream, center(32)).unwrap();
    let pairs: Vec<_> = loader.by_ref().map(|p| p.unwrap()).collect();
    assert_eq!(pairs.len() as u64, u(&exp["usable_pairs"]));
    assert_eq!(loader.source().counts().missing_image, u(&exp["missing_image_skipped"]));
    let mut per_cat: BTreeMap<String, u64> = BTreeMap::new();
    for p in &pairs {
        *per_cat.entry(p.pair.category_name().to_string()).or_insert(0) += 1;
    }
    let want: BTreeMap<String, u64> =
        exp["per_category_usable"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), u(v))).collect();
    assert_eq!(per_cat, want);
    assert_eq!(loader.source().counts().per_category, want);
}

/// A manifest with a missing file, a blank line, scores in both spellings and an absolute path.
#[test]
fn jsonl_missing_files_blank_lines_and_scores() {
    let dir = tmp_dir("manifest");
    let img = RgbImage { width: 8, height: 6, data: (0..8 * 6 * 3).map(|i| (i * 5 % 256) as u8).collect() };
    write_png(&dir.join("a.png"), &img, None).unwrap();
    let abs = dir.join("a.png").display().to_string().replace('\\', "/");
    let text = format!(
        "{}\n\n{}\n{}\n",
        r#"{"prompt": "p0", "chosen": "a.png", "rejected": "a.png", "scores": {"chosen": 0.9, "rejected": 0.1}}"#,
        r#"{"prompt": "p1", "chosen": "a.png", "rejected": "gone.png", "category": "composition"}"#,
        format_args!(r#"{{"prompt": "p2", "chosen": "{abs}", "rejected": "a.png", "scores": [2, 1]}}"#),
    );
    std::fs::write(dir.join("m.jsonl"), text).unwrap();
    let src = DataSource::detect(&dir.join("m.jsonl"), None).unwrap();
    let mut stream = PairStream::open(&src, &StreamOptions::default()).unwrap();
    let pairs: Vec<PreferencePair> = stream.by_ref().map(|p| p.unwrap()).collect();
    assert_eq!(pairs.iter().map(|p| p.prompt.as_str()).collect::<Vec<_>>(), ["p0", "p2"]);
    assert_eq!(pairs.iter().map(|p| p.index).collect::<Vec<_>>(), [0, 3]);
    assert_eq!(pairs[0].scores.map(|s| (s.chosen, s.rejected)), Some((0.9, 0.1)));
    assert_eq!(pairs[1].scores.map(|s| (s.chosen, s.rejected)), Some((2.0, 1.0)));
    let c = stream.counts();
    assert_eq!((c.rows, c.pairs, c.missing_image), (3, 2, 1));

    std::fs::write(dir.join("bad.jsonl"), "{\"prompt\": \"p\", \"chosen\": \"a.png\"}\n").unwrap();
    let src = DataSource::detect(&dir.join("bad.jsonl"), None).unwrap();
    let err = PairStream::open(&src, &StreamOptions::default()).unwrap().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("rejected"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn key_of(p: &PreferencePair) -> (u64, String, bool, Vec<u8>, Vec<u8>) {
    (p.index, p.prompt.clone(), p.tie, p.chosen.read().unwrap().to_vec(), p.rejected.read().unwrap().to_vec())
}

/// After any number of pairs, a stream reopened at the saved cursor yields exactly the rest,
/// and each pair's own cursor reopens at that pair.
fn check_resume(source: &DataSource, opts: &StreamOptions) {
    let all: Vec<_> = PairStream::open(source, opts).unwrap().map(|p| key_of(&p.unwrap())).collect();
    assert!(all.len() > 3);
    for k in 0..=all.len() {
        let mut s = PairStream::open(source, opts).unwrap();
        let first: Vec<_> = s.by_ref().take(k).map(|p| p.unwrap()).collect();
        let cursor = s.cursor();
        // The cursor survives JSON, as it would in a checkpoint.
        let cursor: Cursor = serde_json::from_str(&serde_json::to_string(&cursor).unwrap()).unwrap();
        let rest: Vec<_> =
            PairStream::open_at(source, opts, Some(&cursor)).unwrap().map(|p| key_of(&p.unwrap())).collect();
        assert_eq!(rest, all[k..].to_vec(), "resume after {k} pairs from {cursor:?}");
        if let Some(last) = first.last() {
            let again = PairStream::open_at(source, opts, Some(&last.cursor)).unwrap().next().unwrap().unwrap();
            assert_eq!(key_of(&again), all[k - 1]);
        }
    }
}

#[test]
fn resume_from_cursor_yields_the_same_remaining_pairs() {
    check_resume(&parquet_source(), &StreamOptions::default());
    check_resume(&parquet_source(), &StreamOptions { keep_ties: true });
    check_resume(&jsonl_source(), &StreamOptions::default());
}

/// A shard with several row groups (3, 1 and 4 rows), written here with parquet's writer from
/// the fixture's own cells: resuming inside and across row groups, and the footers' row counts.
#[test]
fn resume_across_row_groups() {
    use parquet::basic::Compression;
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let pairs: Vec<PreferencePair> =
        PairStream::open(&parquet_source(), &StreamOptions::default()).unwrap().take(8).map(|p| p.unwrap()).collect();
    let dir = tmp_dir("rowgroups");
    let schema = Arc::new(
        parse_message_type(
            "message schema { optional binary caption (STRING); optional boolean has_label;
             optional double label_0; optional double label_1; optional binary jpg_0; optional binary jpg_1; }",
        )
        .unwrap(),
    );
    let props = Arc::new(WriterProperties::builder().set_compression(Compression::SNAPPY).build());
    let file = std::fs::File::create(dir.join("train-00000-of-00001.parquet")).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let bytes = |s: &ImageSource| ByteArray::from(s.read().unwrap().to_vec());
    for group in [&pairs[0..3], &pairs[3..4], &pairs[4..8]] {
        let n = group.len();
        let def = vec![1i16; n];
        let mut rg = w.next_row_group().unwrap();
        let mut col = 0;
        while let Some(mut c) = rg.next_column().unwrap() {
            match col {
                0 => {
                    let v: Vec<ByteArray> = group.iter().map(|p| ByteArray::from(p.prompt.as_str())).collect();
                    c.typed::<ByteArrayType>().write_batch(&v, Some(&def), None).unwrap();
                }
                1 => {
                    c.typed::<BoolType>().write_batch(&vec![true; n], Some(&def), None).unwrap();
                }
                // Winner always image 0 here: chosen goes to jpg_0.
                2 | 3 => {
                    let v = vec![if col == 2 { 1.0 } else { 0.0 }; n];
                    c.typed::<DoubleType>().write_batch(&v, Some(&def), None).unwrap();
                }
                _ => {
                    let v: Vec<ByteArray> =
                        group.iter().map(|p| bytes(if col == 4 { &p.chosen } else { &p.rejected })).collect();
                    c.typed::<ByteArrayType>().write_batch(&v, Some(&def), None).unwrap();
                }
            }
            c.close().unwrap();
            col += 1;
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
    let src = DataSource::detect(&dir, None).unwrap();
    let got: Vec<_> = PairStream::open(&src, &StreamOptions::default()).unwrap().map(|p| p.unwrap()).collect();
    assert_eq!(got.len(), 8);
    for (g, p) in got.iter().zip(&pairs) {
        assert_eq!((&g.prompt, &g.chosen, &g.rejected), (&p.prompt, &p.chosen, &p.rejected));
    }
    check_resume(&src, &StreamOptions::default());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_with_a_foreign_cursor_is_an_error() {
    let bad = Cursor::Parquet { shard: 0, file: "other.parquet".into(), row: 0 };
    let e = PairStream::open_at(&parquet_source(), &StreamOptions::default(), Some(&bad)).err().unwrap().to_string();
    assert!(e.contains("other.parquet"), "{e}");
    let bad = Cursor::Jsonl { line: 1, offset: 5 };
    let e = PairStream::open_at(&jsonl_source(), &StreamOptions::default(), Some(&bad)).err().unwrap().to_string();
    assert!(e.contains("not the start of a line"), "{e}");
    let e = PairStream::open_at(&jsonl_source(), &StreamOptions::default(), Some(&Cursor::start(&parquet_source())))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not fit"), "{e}");
}

/// A solid colour stays that colour at any size: (c / 255 - 0.5) / 0.5 exactly.
#[test]
fn solid_png_resizes_to_its_colour() {
    let dir = tmp_dir("solid");
    let (w, h, rgb) = (100, 60, [200u8, 40, 7]);
    let img = RgbImage { width: w, height: h, data: (0..w * h).flat_map(|_| rgb).collect() };
    let path = dir.join("solid.png");
    write_png(&path, &img, None).unwrap();
    let back = decode_source(&ImageSource::File(path)).unwrap();
    assert_eq!((back.width, back.height), (w, h));
    for (size, resample, crop) in [(32, Resample::Bilinear, Crop::Center), (48, Resample::Lanczos, Crop::Random)] {
        let opts = LoaderOptions { size, resample, crop, flip: true, seed: 3 };
        let x = preprocess(&back, &opts, 0, 0);
        assert_eq!(x.len(), 3 * size * size);
        for c in 0..3 {
            let want = (rgb[c] as f64 / 255.0 - 0.5) / 0.5;
            let plane = &x[c * size * size..(c + 1) * size * size];
            let err = plane.iter().fold(0f64, |m, &v| m.max((v as f64 - want).abs()));
            assert!(err < 1e-6, "channel {c} size {size} {resample:?}: max error {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An exact 2x bilinear downscale is PIL's [1, 3, 3, 1] / 8 filter (renormalised at the borders),
/// each pass rounded to 8 bits; a 96x64 image at size 32 is resized to 48x32 and center-cropped
/// at column 8. Checked against that computed here in f64 on random pixels.
#[test]
fn bilinear_downscale_and_center_crop_match_a_reference() {
    let (w, h, size) = (96usize, 64usize, 32usize);
    let mut rng = vipo::rng::Rng::new(11);
    let data: Vec<u8> = (0..w * h * 3).map(|_| (rng.next_u64() % 256) as u8).collect();
    let img = RgbImage { width: w, height: h, data };
    assert_eq!(resized_size(w, h, size), (48, 32));
    assert_eq!(resized_size(64, 112, 48), (48, 84));
    assert_eq!(resized_size(98, 64, 32), (49, 32));
    // 1-D 2x downscale of `get(0..n)`, taps [1,3,3,1]/8 over inputs 2o-1..2o+3, clipped and renormalised.
    let down = |n: usize, get: &dyn Fn(usize) -> f64| -> Vec<f64> {
        (0..n / 2)
            .map(|o| {
                let (mut acc, mut tot) = (0.0, 0.0);
                for (k, wk) in [1.0, 3.0, 3.0, 1.0].iter().enumerate() {
                    let x = 2 * o as i64 - 1 + k as i64;
                    if x >= 0 && (x as usize) < n {
                        acc += wk * get(x as usize);
                        tot += wk;
                    }
                }
                (acc / tot + 0.5).floor().clamp(0.0, 255.0)
            })
            .collect()
    };
    let x = resize_crop(&img, size, Resample::Bilinear, 0, 8, false);
    let xf = resize_crop(&img, size, Resample::Bilinear, 0, 8, true);
    let mut worst = 0f64;
    let mut off = 0;
    for c in 0..3 {
        // Horizontal pass per row, then vertical per column.
        let rows: Vec<Vec<f64>> = (0..h).map(|y| down(w, &|x| img.data[(y * w + x) * 3 + c] as f64)).collect();
        for j in 0..size {
            let col = down(h, &|y| rows[y][j + 8]);
            for (i, v) in col.iter().enumerate() {
                let want = v / 127.5 - 1.0;
                let got = x[(c * size + i) * size + j] as f64;
                let d = (got - want).abs();
                worst = worst.max(d);
                off += (d > 1e-6) as usize;
                assert_eq!(xf[(c * size + i) * size + (size - 1 - j)], x[(c * size + i) * size + j], "flip");
            }
        }
    }
    eprintln!("2x bilinear vs f64 reference: max error {worst:.2e}, {off} of {} values off", 3 * size * size);
    // f32 accumulation may land a .5 on the other side in rare pixels: one 8-bit step at most.
    assert!(worst <= 2.0 / 255.0 + 1e-6, "max error {worst}");
    assert!(off * 200 < 3 * size * size, "{off} of {} values off by one step", 3 * size * size);
    assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
}

/// Every fixture image comes out (3, S, S) in [-1, 1], with Lanczos too (which overshoots before
/// clamping).
#[test]
fn loader_outputs_requested_size_in_range() {
    for (src, size, resample) in [(parquet_source(), 48, Resample::Lanczos), (jsonl_source(), 40, Resample::Bilinear)] {
        let opts = LoaderOptions { size, resample, crop: Crop::Random, flip: true, seed: 5 };
        let mut loader = PairLoader::new(PairStream::open(&src, &StreamOptions::default()).unwrap(), opts).unwrap();
        let batch = loader.next_batch(100).unwrap();
        assert!(!batch.is_empty());
        for p in &batch {
            for x in [&p.chosen, &p.rejected] {
                assert_eq!(x.len(), 3 * size * size);
                assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
                assert!(x.iter().any(|&v| v != x[0]), "constant image");
            }
        }
        let t = vipo::data::image::stack_pairs(&batch[..2], &Device::Cpu).unwrap();
        assert_eq!(t.shape(), &[4, 3, size, size]);
        let v = t.to_vec().unwrap();
        assert_eq!(&v[..3 * size * size], &batch[0].chosen[..]);
        assert_eq!(&v[2 * 3 * size * size..3 * 3 * size * size], &batch[0].rejected[..]);
    }
}

#[test]
fn random_crop_and_flip_are_deterministic_per_seed() {
    let run = |seed: u64, batch: usize| -> Vec<Vec<f32>> {
        let opts = LoaderOptions { size: 48, resample: Resample::Bilinear, crop: Crop::Random, flip: true, seed };
        let mut loader =
            PairLoader::new(PairStream::open(&parquet_source(), &StreamOptions::default()).unwrap(), opts).unwrap();
        let mut out = Vec::new();
        loop {
            let b = loader.next_batch(batch).unwrap();
            if b.is_empty() {
                break;
            }
            out.extend(b.into_iter().flat_map(|p| [p.chosen, p.rejected]));
        }
        out
    };
    let a = run(7, 4);
    assert_eq!(a.len(), 38);
    // Same seed: same pixels, whatever the batching (and so the threads) did.
    assert_eq!(a, run(7, 1));
    assert_eq!(a, run(7, 64));
    let b = run(8, 4);
    let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert!(differ > 10, "seeds 7 and 8 differ in only {differ} of 38 images");
    // Augmentation really happens: some images differ from the plain center crop.
    let plain: Vec<Vec<f32>> =
        PairLoader::new(PairStream::open(&parquet_source(), &StreamOptions::default()).unwrap(), center(48))
            .unwrap()
            .flat_map(|p| {
                let p = p.unwrap();
                [p.chosen, p.rejected]
            })
            .collect();
    assert!(a.iter().zip(&plain).filter(|(x, y)| x != y).count() > 10);
    // Resuming with the saved draw count continues the same crops.
    let opts = LoaderOptions { size: 48, resample: Resample::Bilinear, crop: Crop::Random, flip: true, seed: 7 };
    let mut l = PairLoader::new(PairStream::open(&parquet_source(), &StreamOptions::default()).unwrap(), opts).unwrap();
    let _ = l.next_batch(5).unwrap();
    let (cursor, draws) = (l.source().cursor(), l.draws());
    let s = PairStream::open_at(&parquet_source(), &StreamOptions::default(), Some(&cursor)).unwrap();
    let rest: Vec<Vec<f32>> = PairLoader::new(s, opts)
        .unwrap()
        .with_draws(draws)
        .flat_map(|p| {
            let p = p.unwrap();
            [p.chosen, p.rejected]
        })
        .collect();
    assert_eq!(rest, a[10..].to_vec());
}

#[test]
fn broken_bytes_are_errors_not_panics() {
    for bytes in [&b""[..], &b"\xff\xd8\xff\xe0 not really"[..], &[0u8; 300][..], &b"\x89PNG\r\n\x1a\n"[..]] {
        assert!(decode(bytes).is_err());
    }
}

#[test]
fn category_weights_sample_deterministically() {
    let w = parse_category_weights("aesthetics=2, composition=1,text rendering=0").unwrap();
    assert_eq!(w.len(), 3);
    assert!(parse_category_weights("aesthetics").is_err());
    assert!(parse_category_weights("a=-1").is_err());
    assert!(parse_category_weights("a=0").is_err());
    assert!(parse_category_weights("a=1,a=2").is_err());
    let opts = StreamOptions::default();
    let draw = |seed: u64, n: usize| -> Vec<(u64, String)> {
        CategorySampler::new(&jsonl_source(), &opts, &w, seed)
            .unwrap()
            .take(n)
            .map(|p| {
                let p = p.unwrap();
                (p.index, p.category_name().to_string())
            })
            .collect()
    };
    let a = draw(1, 600);
    assert_eq!(a, draw(1, 600));
    assert_ne!(a, draw(2, 600));
    let aes = a.iter().filter(|(_, c)| c == "aesthetics").count();
    let comp = a.iter().filter(|(_, c)| c == "composition").count();
    assert_eq!(aes + comp, 600, "only weighted categories are drawn");
    // Binomial(600, 2/3): mean 400, sd 11.5.
    assert!((350..450).contains(&aes), "aesthetics drawn {aes} of 600 with weight 2:1");
    // Within a category, pairs cycle in source order.
    let aes_idx: Vec<u64> = a.iter().filter(|(_, c)| c == "aesthetics").map(|(i, _)| *i).take(6).collect();
    assert_eq!(aes_idx, [0, 1, 2, 0, 1, 2]);
    // Resume from a saved state continues the same sequence.
    let mut s = CategorySampler::new(&jsonl_source(), &opts, &w, 1).unwrap();
    let _: Vec<_> = s.by_ref().take(37).collect();
    let state = serde_json::to_string(&s.state()).unwrap();
    let resumed = CategorySampler::resume(&jsonl_source(), &opts, &serde_json::from_str(&state).unwrap()).unwrap();
    let rest: Vec<(u64, String)> = resumed
        .take(100)
        .map(|p| {
            let p = p.unwrap();
            (p.index, p.category_name().to_string())
        })
        .collect();
    assert_eq!(rest, a[37..137].to_vec());
    // A category with no pairs is a clear error.
    let w = parse_category_weights("landscapes=1").unwrap();
    let e = CategorySampler::new(&jsonl_source(), &opts, &w, 0).unwrap().next().unwrap().unwrap_err().to_string();
    assert!(e.contains("landscapes") && e.contains("no pairs"), "{e}");
}

fn vipo_data(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vipo")).arg("data").args(args).output().unwrap();
    assert!(o.status.success(), "vipo data {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn cli_stats_reports_expected_numbers() {
    let exp = expected();
    let (p, j) = (&exp["parquet"], &exp["jsonl"]);
    let data = fixture().join("data");
    let text = vipo_data(&["stats", data.to_str().unwrap()]);
    for line in [
        format!("rows: {}", p["rows"]),
        format!("usable pairs: {}", p["usable_pairs"]),
        format!("ties: {} (dropped", p["ties_dropped"]),
        format!("rows without a label: {}", p["no_label_skipped"]),
        format!("undecodable images: {} (in {} skipped pairs)", p["corrupt_skipped"], p["corrupt_skipped"]),
        format!("winner: image 0 in {}, image 1 in {}", p["chosen_image_0"], p["chosen_image_1"]),
        format!("  (none): {}", p["usable_pairs"]),
    ] {
        assert!(text.contains(&line), "missing `{line}` in:\n{text}");
    }
    let kept = vipo_data(&["stats", data.to_str().unwrap(), "--keep-ties"]);
    assert!(kept.contains(&format!("usable pairs: {}", p["usable_pairs_keep_ties"])), "{kept}");

    // Sizes: every image that decodes among the rows a run reads (usable and corrupt ones).
    let mut sizes: BTreeMap<(usize, usize), u64> = BTreeMap::new();
    for r in p["per_row"].as_array().unwrap() {
        if matches!(r["status"].as_str(), Some("usable" | "corrupt")) {
            for k in ["jpg_0_size_wh", "jpg_1_size_wh"] {
                if let Some(s) = wh(&r[k]) {
                    *sizes.entry(s).or_insert(0) += 1;
                }
            }
        }
    }
    let json: Value = serde_json::from_str(&vipo_data(&["stats", data.to_str().unwrap(), "--json"])).unwrap();
    let s = &json["sizes"];
    assert_eq!(u(&s["images"]), sizes.values().sum::<u64>());
    assert_eq!(u(&s["min_width"]) as usize, sizes.keys().map(|k| k.0).min().unwrap());
    assert_eq!(u(&s["max_width"]) as usize, sizes.keys().map(|k| k.0).max().unwrap());
    assert_eq!(u(&s["min_height"]) as usize, sizes.keys().map(|k| k.1).min().unwrap());
    assert_eq!(u(&s["max_height"]) as usize, sizes.keys().map(|k| k.1).max().unwrap());
    let top = *sizes.values().max().unwrap();
    let (&(w, h), _) = sizes.iter().find(|(_, &n)| n == top).unwrap();
    assert_eq!(s["most_common"], serde_json::json!([w, h, top]));
    let (w, h) = (w.to_string(), h.to_string());
    assert!(text.contains(&format!("most common {w}x{h} ({top} images)")), "{text}");
    assert_eq!(u(&json["undecodable_images"]), u(&p["corrupt_skipped"]));

    let text = vipo_data(&["stats", fixture().join("pairs.jsonl").to_str().unwrap()]);
    assert!(text.contains(&format!("rows: {}", j["lines"])), "{text}");
    assert!(text.contains(&format!("usable pairs: {}", j["usable_pairs"])), "{text}");
    assert!(text.contains(&format!("missing image files: {}", j["missing_image_skipped"])), "{text}");
    for (cat, n) in j["per_category_usable"].as_object().unwrap() {
        assert!(text.contains(&format!("  {cat}: {n}\n")), "missing {cat}: {n} in:\n{text}");
    }
}

fn vae_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/sd15_tiny_pipeline/vae")
}

/// Encode the manifest's pairs at 64 px into several shards, reload, and compare with latents
/// computed here one image at a time; a different size or VAE is refused with a clear error.
#[test]
fn latent_cache_round_trip() {
    let dev = Device::Cpu;
    let vae = AutoencoderKL::from_dir(vae_dir(), &dev, None).unwrap();
    vae.store().freeze_all();
    let out = tmp_dir("cache");
    let key = CacheKey::for_vae(&vae_dir(), None, 64, Resample::Bilinear).unwrap();
    assert_eq!(key.vae_fingerprint, cache::vae_fingerprint(&vae_dir(), None).unwrap());
    let opts = BuildOptions { size: 64, batch: 3, shard_pairs: 5, ..BuildOptions::default() };
    let stream = PairStream::open(&jsonl_source(), &StreamOptions::default()).unwrap();
    let m = cache::build(stream, &jsonl_source(), &vae, &vae_dir(), &out, &opts, &mut |_| {}).unwrap();
    assert_eq!(m.pairs, 16);
    assert_eq!(m.shards.len(), 4);
    assert_eq!(m.latent_shape, [4, 8, 8]);

    let c = LatentCache::open_checked(&out, &key).unwrap();
    assert_eq!(c.len(), 16);
    let all: Vec<_> = c.iter().map(|p| p.unwrap()).collect();
    assert_eq!(all.iter().map(|p| p.info.index).collect::<Vec<_>>(), (0..16).collect::<Vec<u64>>());
    let pairs: Vec<PreferencePair> =
        PairStream::open(&jsonl_source(), &StreamOptions::default()).unwrap().map(|p| p.unwrap()).collect();
    for i in [0usize, 6, 15] {
        let got = c.get(i as u64).unwrap().unwrap();
        assert_eq!(got, all[i]);
        assert_eq!(got.info.prompt, pairs[i].prompt);
        assert_eq!(got.info.category, pairs[i].category);
        for (src, cached) in [(&pairs[i].chosen, &got.chosen), (&pairs[i].rejected, &got.rejected)] {
            let x = preprocess(&decode_source(src).unwrap(), &center(64), 0, 0);
            let x = Tensor::from_vec(x, &[1, 3, 64, 64], &dev).unwrap();
            let want = vae.latents_from_image(&x, None).unwrap().to_vec().unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = want.iter().zip(cached).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            // Batched and single-image convolutions sum in different orders.
            eprintln!("pair {i}: cached vs direct latents, max relative error {err:.1e} (max |z| {scale:.3})");
            assert!(err < 1e-5, "pair {i}: relative error {err}");
        }
    }
    assert_eq!(c.get(99).unwrap(), None);

    let e = LatentCache::open_checked(&out, &CacheKey { size: 128, ..key.clone() }).err().unwrap().to_string();
    assert!(e.contains("size 64 px vs 128 px"), "{e}");
    let fp16 = cache::vae_fingerprint(&vae_dir(), Some("fp16")).unwrap();
    assert_ne!(fp16, key.vae_fingerprint);
    let e =
        LatentCache::open_checked(&out, &CacheKey { vae_fingerprint: fp16, ..key.clone() }).err().unwrap().to_string();
    assert!(e.contains("VAE fingerprint") && e.contains("cache-latents"), "{e}");
    // An existing cache is not overwritten by accident.
    let stream = PairStream::open(&jsonl_source(), &StreamOptions::default()).unwrap();
    let e = cache::build(stream, &jsonl_source(), &vae, &vae_dir(), &out, &opts, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("--overwrite"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

/// The CLI path: parquet with a broken JPEG, one shard, then reused.
#[test]
fn cli_cache_latents() {
    let out = tmp_dir("cli-cache");
    let data = fixture().join("data");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_vipo"))
        .args(["--device", "cpu", "data", "cache-latents", data.to_str().unwrap()])
        .args(["--vae", vae_dir().to_str().unwrap(), "--size", "64", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = LatentCache::open(&out).unwrap();
    assert_eq!(c.len(), 19);
    assert_eq!(c.manifest().undecodable_pairs, 1);
    assert_eq!(c.manifest().source_counts.ties, 3);
    assert!(c.get(20).unwrap().is_none(), "row 20 has the broken JPEG");
    let _ = std::fs::remove_dir_all(&out);
}

/// Throughput on Pick-a-Pic-sized JPEGs (1024 and 768 px, quality 90) at 512 px:
/// `cargo test --test data -- --ignored --nocapture throughput`.
#[test]
#[ignore]
fn throughput() {
    use image::codecs::jpeg::JpegEncoder;
    let dir = tmp_dir("throughput");
    for (name, side) in [("a.jpg", 1024u32), ("b.jpg", 768)] {
        // Smooth gradients plus noise: JPEG sizes like real renders (a few hundred KB).
        let mut rng = vipo::rng::Rng::new(side as u64);
        let px: Vec<u8> = (0..side * side)
            .flat_map(|i| {
                let (x, y) = (i % side, i / side);
                let n = (rng.next_u64() % 48) as u32;
                [((x * 255 / side + n) % 256) as u8, ((y * 255 / side + n) % 256) as u8, ((x + y) % 256) as u8]
            })
            .collect();
        let mut f = std::fs::File::create(dir.join(name)).unwrap();
        JpegEncoder::new_with_quality(&mut f, 90).encode(&px, side, side, image::ExtendedColorType::Rgb8).unwrap();
    }
    let n = 64;
    let lines: String =
        (0..n).map(|i| format!("{{\"prompt\": \"p{i}\", \"chosen\": \"a.jpg\", \"rejected\": \"b.jpg\"}}\n")).collect();
    std::fs::write(dir.join("m.jsonl"), lines).unwrap();
    let src = DataSource::detect(&dir.join("m.jsonl"), None).unwrap();
    let kb = std::fs::metadata(dir.join("a.jpg")).unwrap().len() / 1024;
    for (crop, flip) in [(Crop::Center, false), (Crop::Random, true)] {
        let opts = LoaderOptions { size: 512, resample: Resample::Bilinear, crop, flip, seed: 1 };
        let mut l = PairLoader::new(PairStream::open(&src, &StreamOptions::default()).unwrap(), opts).unwrap();
        let t = std::time::Instant::now();
        let mut got = 0;
        loop {
            let b = l.next_batch(16).unwrap();
            if b.is_empty() {
                break;
            }
            got += b.len();
        }
        let s = t.elapsed().as_secs_f64();
        eprintln!(
            "{got} pairs (1024 px {kb} KB + 768 px JPEG) -> 512 px {crop:?} flip {flip}: {s:.2} s, {:.1} pairs/s on {} threads",
            got as f64 / s,
            rayon::current_num_threads()
        );
    }
    let bytes = std::fs::read(dir.join("a.jpg")).unwrap();
    let t = std::time::Instant::now();
    let img = decode(&bytes).unwrap();
    let td = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let _ = resize_crop(&img, 512, Resample::Bilinear, 0, 0, false);
    let tr = t.elapsed().as_secs_f64();
    eprintln!("one 1024 px JPEG: decode {:.1} ms, resize+crop to 512 {:.1} ms", td * 1e3, tr * 1e3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn folders_of_several_splits_need_split() {
    let dir = tmp_dir("splits");
    let shard = fixture().join("data/train-00000-of-00002.parquet");
    std::fs::copy(&shard, dir.join("train-00000-of-00001.parquet")).unwrap();
    std::fs::copy(&shard, dir.join("test-00000-of-00001.parquet")).unwrap();
    let e = DataSource::detect(&dir, None).unwrap_err().to_string();
    assert!(e.contains("--split") && e.contains("test, train"), "{e}");
    match DataSource::detect(&dir, Some("train")).unwrap() {
        DataSource::Parquet { shards } => assert_eq!(shards, [dir.join("train-00000-of-00001.parquet")]),
        s => panic!("{s:?}"),
    }
    let e = DataSource::detect(&dir, Some("validation")).unwrap_err().to_string();
    assert!(e.contains("validation-*.parquet"), "{e}");
    let e = DataSource::detect(&fixture(), None).unwrap_err().to_string();
    assert!(e.contains("data/"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
