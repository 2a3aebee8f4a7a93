//! Multi-scorer manifests and `vipo data agree`: hand-made manifests whose expected counts are
//! worked out below from the data, the `--out` round trip through the trainer's reader, errors
//! naming the line, and the CLI's text and JSON outputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vipo::data::agree::{self, agreement, filter_agreed, several, vote, Votes, DEFAULT_TIE_TOL};
use vipo::data::jsonl::parse_line;
use vipo::data::{DataSource, ImageSource, PairScores, PairStream, PreferencePair, Scores, StreamOptions};
use vipo::image_io::{write_png, RgbImage};

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vipo-agree-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `dir/data/m.jsonl` with images `dir/data/img/{a,b}.png`. Scorers count, colour, aesthetic;
/// default tie tolerance 1e-6. Per line (+ agrees with the label, - disagrees, 0 tie):
///
/// ```text
/// line  prompt cat      count colour aesthetic  verdict
///  1    p1     animals  +     0      +          agreed
///  2    p2     animals  +     +      +          agreed, strict   (`caption`, absolute chosen path)
///  3    p3     animals  +     -      +          vetoed
///  4    p4     scenes   0     0(1e-7)           all tied
///  5    p5     -        single {chosen, rejected}  fewer (not judged)
///  6    p6     -        count only              fewer (one name)
///  7    p7     scenes   +            +(0.01)    agreed, strict   (`./img/../img/b.png`)
///  8    (blank)
///  9    p8     -        no scores               fewer
/// 10    p9     scenes   -     -                 vetoed
/// ```
///
/// pairs 9, several 6, fewer 3, agreed 3 (p1 p2 p7), strict 2 (p2 p7), vetoed 2 (p3 p9), all
/// tied 1 (p4): 3 + 2 + 1 = 6. Per scorer over the 6 judged pairs: count 6 pairs, 4 / 1 / 1 (p6's
/// count is not judged); colour 5 pairs (p1 p2 p3 p4 p9), 1 / 2 / 2; aesthetic 4 pairs, 4 / 0 / 0.
/// Per category: animals 3 pairs, 3 several, 2 agreed, 1 strict; scenes 3, 3, 1, 1; (none) 3, 0, 0.
/// With --tie-tol 0.05 p7's aesthetic (0.01) becomes a tie: agreed stays 3, strict drops to 1.
fn manifest(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(data.join("img")).unwrap();
    for (name, k) in [("a.png", 3usize), ("b.png", 7)] {
        let img = RgbImage { width: 8, height: 6, data: (0..8 * 6 * 3).map(|i| (i * k % 256) as u8).collect() };
        write_png(&data.join("img").join(name), &img, None).unwrap();
    }
    let abs = data.join("img/a.png").display().to_string().replace('\\', "/");
    let lines = [
        r#"{"prompt": "p1", "chosen": "img/a.png", "rejected": "img/b.png", "category": "animals", "extra": {"k": 1}, "scores": {"count": [0.5, 0.25], "colour": [1.0, 1.0], "aesthetic": {"chosen": 0.7, "rejected": 0.3}}}"#.to_string(),
        format!(r#"{{"caption": "p2", "chosen": "{abs}", "rejected": "img/b.png", "category": "animals", "scores": {{"count": [1, 0], "colour": [0.9, 0.1], "aesthetic": [0.6, 0.2]}}}}"#),
        r#"{"prompt": "p3", "chosen": "img/a.png", "rejected": "img/b.png", "category": "animals", "scores": {"count": [1, 0], "colour": [0.2, 0.8], "aesthetic": [0.5, 0.4]}}"#.into(),
        r#"{"prompt": "p4", "chosen": "img/a.png", "rejected": "img/b.png", "category": "scenes", "scores": {"count": [0.3, 0.3], "colour": [0.5, 0.5000001]}}"#.into(),
        r#"{"prompt": "p5", "chosen": "img/a.png", "rejected": "img/b.png", "scores": {"chosen": 0.9, "rejected": 0.1}}"#.into(),
        r#"{"prompt": "p6", "chosen": "img/a.png", "rejected": "img/b.png", "scores": {"count": [1, 0]}}"#.into(),
        r#"{"prompt": "p7", "chosen": "img/a.png", "rejected": "./img/../img/b.png", "category": "scenes", "scores": {"count": [0.8, 0.1], "aesthetic": [0.51, 0.5]}}"#.into(),
        String::new(),
        r#"{"prompt": "p8", "chosen": "img/a.png", "rejected": "img/b.png"}"#.into(),
        r#"{"prompt": "p9", "chosen": "img/a.png", "rejected": "img/b.png", "category": "scenes", "scores": {"count": [0.1, 0.9], "colour": [0.1, 0.9]}}"#.into(),
    ];
    let path = data.join("m.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn read_pairs(path: &Path) -> Vec<PreferencePair> {
    let src = DataSource::detect(path, None).unwrap();
    let mut stream = PairStream::open(&src, &StreamOptions::default()).unwrap();
    let pairs: Vec<_> = stream.by_ref().map(|p| p.unwrap()).collect();
    assert_eq!(stream.counts().missing_image, 0, "{}", path.display());
    pairs
}

fn file_of(s: &ImageSource) -> &Path {
    match s {
        ImageSource::File(p) => p,
        ImageSource::Bytes(_) => panic!("a manifest pair holds files"),
    }
}

#[test]
fn votes_and_scores_forms() {
    let s = |chosen, rejected| Scores { chosen, rejected };
    assert_eq!(vote(&s(1.0, 0.0), 1e-6), 1);
    assert_eq!(vote(&s(0.0, 1.0), 1e-6), -1);
    assert_eq!(vote(&s(0.5, 0.5 + 1e-7), 1e-6), 0);
    assert_eq!(vote(&s(0.51, 0.5), 0.05), 0);
    let named = [("a".to_string(), s(1.0, 0.0)), ("b".to_string(), s(0.5, 0.5))].into_iter().collect();
    let v = Votes::of(&named, DEFAULT_TIE_TOL);
    assert_eq!(v, Votes { agree: 1, disagree: 0, tie: 1 });
    assert!(v.agreed() && !v.strict());

    // The single form keeps its meaning; several names are named scores.
    let l =
        parse_line(Path::new("m.jsonl"), 1, r#"{"prompt":"p","chosen":"a","rejected":"b","scores":[2,1]}"#).unwrap();
    assert_eq!(l.scores, Some(PairScores::Single(s(2.0, 1.0))));
    assert!(several(l.scores.as_ref()).is_none());
    let text = r#"{"prompt":"p","chosen":"a","rejected":"b","scores":{"x":[1,0],"y":{"chosen":0.2,"rejected":0.4}}}"#;
    let l = parse_line(Path::new("m.jsonl"), 1, text).unwrap();
    let named = several(l.scores.as_ref()).unwrap();
    assert_eq!(named.get("y"), Some(&s(0.2, 0.4)));
    assert_eq!(Votes::of(named, DEFAULT_TIE_TOL), Votes { agree: 1, disagree: 1, tie: 0 });
}

#[test]
fn agreement_counts() {
    let dir = tmp_dir("counts");
    let m = manifest(&dir);
    let a = agreement(&m, DEFAULT_TIE_TOL).unwrap();
    assert_eq!((a.pairs, a.several_scores, a.fewer_scores), (9, 6, 3));
    assert_eq!((a.agreed, a.strict, a.vetoed, a.all_tied), (3, 2, 2, 1));
    assert_eq!(a.agreement_rate, Some(0.5));
    assert_eq!(a.strict_rate, Some(2.0 / 6.0));
    let sc = |k: &str| {
        let c = &a.per_scorer[k];
        (c.pairs, c.agree, c.disagree, c.tie)
    };
    assert_eq!(sc("count"), (6, 4, 1, 1));
    assert_eq!(sc("colour"), (5, 1, 2, 2));
    assert_eq!(sc("aesthetic"), (4, 4, 0, 0));
    assert_eq!(a.per_scorer.len(), 3);
    let cat = |k: &str| {
        let c = &a.per_category[k];
        (c.pairs, c.several_scores, c.agreed, c.strict, c.agreement_rate)
    };
    assert_eq!(cat("animals"), (3, 3, 2, 1, Some(2.0 / 3.0)));
    assert_eq!(cat("scenes"), (3, 3, 1, 1, Some(1.0 / 3.0)));
    assert_eq!(cat("(none)"), (3, 0, 0, 0, None));
    assert_eq!(a.out, None);

    let a = agreement(&m, 0.05).unwrap();
    assert_eq!((a.agreed, a.strict, a.vetoed, a.all_tied), (3, 1, 2, 1));
    assert_eq!(a.per_scorer["aesthetic"].tie, 1);

    let err = agreement(&m, -1.0).unwrap_err().to_string();
    assert!(err.contains("--tie-tol"), "{err}");

    // The trainer's reader takes every line: the single form keeps its scores, named ones have none.
    let pairs = read_pairs(&m);
    assert_eq!(pairs.len(), 9);
    assert_eq!(pairs[4].prompt, "p5");
    assert_eq!(pairs[4].scores, Some(Scores { chosen: 0.9, rejected: 0.1 }));
    assert_eq!(pairs[0].scores, None);
    assert_eq!(pairs[1].prompt, "p2");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without any category there is no per-category table.
#[test]
fn no_categories_no_table() {
    let dir = tmp_dir("nocat");
    let m = dir.join("m.jsonl");
    std::fs::write(&m, r#"{"prompt":"p","chosen":"a","rejected":"b","scores":{"x":[1,0],"y":[1,0]}}"#).unwrap();
    let a = agreement(&m, DEFAULT_TIE_TOL).unwrap();
    assert_eq!((a.pairs, a.agreed, a.strict), (1, 1, 1));
    assert!(a.per_category.is_empty());
    assert!(!a.to_text().contains("per category"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_lines_name_file_and_line() {
    let dir = tmp_dir("bad");
    let ok = r#"{"prompt":"p","chosen":"a","rejected":"b","scores":{"x":[1,0],"y":[1,0]}}"#;
    let cases = [
        (format!("{ok}\n{{\"prompt\": \n"), "line 2", "not a pair object"),
        (
            format!(
                "{ok}\n\n{}\n",
                r#"{"prompt":"p","chosen":"a","rejected":"b","scores":{"count":["a",1],"y":[1,0]}}"#
            ),
            "line 3",
            "scores.count",
        ),
        (format!("{}\n", r#"{"prompt":"p","chosen":"a","rejected":"b","scores":[1]}"#), "line 1", "scores:"),
        (
            format!("{}\n", r#"{"prompt":"p","chosen":"a","rejected":"b","scores":{"chosen":"x","rejected":1}}"#),
            "line 1",
            "scores:",
        ),
        ("[\"p\", \"a\", \"b\"]\n".to_string(), "line 1", "not a pair object"),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let m = dir.join(format!("bad{i}.jsonl"));
        std::fs::write(&m, text).unwrap();
        let err = agreement(&m, DEFAULT_TIE_TOL).unwrap_err().to_string();
        assert!(err.contains(&format!("bad{i}.jsonl")) && err.contains(line) && err.contains(what), "{err}");
        // The trainer's reader fails the same way.
        let src = DataSource::detect(&m, None).unwrap();
        let err = PairStream::open(&src, &StreamOptions::default())
            .unwrap()
            .find_map(|p| p.err())
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(line) && err.contains(what), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--out` in the same folder, a subfolder, a new folder elsewhere: the trainer's reader reads
/// the three agreed pairs back with every image resolving to the original files, and the other
/// fields kept.
#[test]
fn filter_round_trip() {
    let dir = tmp_dir("out");
    let m = manifest(&dir);
    let abs_a = m.parent().unwrap().join("img/a.png").canonicalize().unwrap();
    let abs_b = m.parent().unwrap().join("img/b.png").canonicalize().unwrap();
    for (out, rel_a) in [
        (dir.join("data/agreed.jsonl"), "img/a.png"),
        (dir.join("data/sub/agreed.jsonl"), "../img/a.png"),
        (dir.join("elsewhere/deeper/agreed.jsonl"), "../../data/img/a.png"),
    ] {
        let a = filter_agreed(&m, &out, DEFAULT_TIE_TOL).unwrap();
        assert_eq!((a.agreed, a.out.as_deref()), (3, Some(out.as_path())));
        assert!(!out.with_extension("jsonl.tmp").exists());

        let lines: Vec<Value> =
            std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["chosen"], rel_a, "{}", out.display());
        assert_eq!(lines[0]["extra"]["k"], 1);
        assert_eq!(lines[0]["scores"]["aesthetic"]["chosen"], 0.7);
        assert_eq!(lines[1]["caption"], "p2");
        // An absolute path stays absolute.
        assert!(Path::new(lines[1]["chosen"].as_str().unwrap()).is_absolute());
        assert!(!Path::new(lines[2]["rejected"].as_str().unwrap()).is_absolute());

        let pairs = read_pairs(&out);
        assert_eq!(pairs.iter().map(|p| p.prompt.as_str()).collect::<Vec<_>>(), ["p1", "p2", "p7"]);
        assert_eq!(pairs.iter().map(|p| p.category_name()).collect::<Vec<_>>(), ["animals", "animals", "scenes"]);
        for p in &pairs {
            assert_eq!(file_of(&p.chosen).canonicalize().unwrap(), abs_a);
            assert_eq!(file_of(&p.rejected).canonicalize().unwrap(), abs_b);
        }
        // The scores came along: every written pair is agreed again.
        let again = agreement(&out, DEFAULT_TIE_TOL).unwrap();
        assert_eq!((again.pairs, again.several_scores, again.agreed, again.strict), (3, 3, 3, 2));
    }
    let err = filter_agreed(&m, &m, DEFAULT_TIE_TOL).unwrap_err().to_string();
    assert!(err.contains("--out"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn vipo(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vipo")).args(args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_text_and_json() {
    let dir = tmp_dir("cli");
    let m = manifest(&dir);
    let ms = m.to_str().unwrap();
    let (ok, out, err) = vipo(&["data", "agree", ms]);
    assert!(ok, "{err}");
    let want = format!(
        "source: {ms}
tie tolerance: 0.000001
pairs: 9
pairs with several scores: 6 (3 with fewer: counted, not judged, never written by --out)
agreed: 3 / 6 (50.00%): no scorer prefers the rejected image, at least one the chosen
strict: 2 / 6 (33.33%): every scorer prefers the chosen image
vetoed (a scorer prefers the rejected image): 2; all tied: 1
per scorer (agrees / disagrees / ties with the label, of the judged pairs it scored):
  aesthetic: 4 / 0 / 0 of 4
  colour: 1 / 2 / 2 of 5
  count: 4 / 1 / 1 of 6
per category (agreed / pairs with several scores, of pairs):
  (none): 0 / 0 (n/a) of 3
  animals: 2 / 3 (66.67%) of 3
  scenes: 1 / 3 (33.33%) of 3
"
    );
    assert_eq!(out, want);

    let o = dir.join("clean/agreed.jsonl");
    let (ok, out, err) = vipo(&["data", "agree", ms, "--json", "--tie-tol", "0.05", "--out", o.to_str().unwrap()]);
    assert!(ok, "{err}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["pairs"], 9);
    assert_eq!(j["several_scores"], 6);
    assert_eq!(j["fewer_scores"], 3);
    assert_eq!(j["agreed"], 3);
    assert_eq!(j["strict"], 1);
    assert_eq!(j["vetoed"], 2);
    assert_eq!(j["all_tied"], 1);
    assert_eq!(j["agreement_rate"], 0.5);
    assert_eq!(j["tie_tol"], 0.05);
    assert_eq!(j["per_scorer"]["aesthetic"], serde_json::json!({"pairs": 4, "agree": 3, "disagree": 0, "tie": 1}));
    assert_eq!(j["per_category"]["(none)"]["agreement_rate"], Value::Null);
    assert_eq!(j["per_category"]["animals"]["agreed"], 2);
    assert_eq!(j["out"], o.to_str().unwrap());
    assert_eq!(read_pairs(&o).len(), 3);

    let (ok, out, _) = vipo(&["data", "agree", ms, "--out", o.to_str().unwrap()]);
    assert!(ok && out.ends_with(&format!("wrote 3 agreed pairs to {}\n", o.display())), "{out}");

    let bad = dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\":\"p\",\"chosen\":\"a\",\"rejected\":\"b\",\"scores\":{\"x\":[true,1]}}\n")
        .unwrap();
    let (ok, _, err) = vipo(&["data", "agree", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("bad.jsonl") && err.contains("line 1") && err.contains("scores.x"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn agree_module_is_public() {
    // The demo builds its clean set through these; keep the paths stable.
    let _: fn(&Path, f64) -> vipo::Result<agree::Agreement> = agree::agreement;
    let _: fn(&Path, &Path, f64) -> vipo::Result<agree::Agreement> = agree::filter_agreed;
}
