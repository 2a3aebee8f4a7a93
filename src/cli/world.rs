//! `vipo world`: the built-in world — pretrain its base model, render and score prompts.

use std::path::PathBuf;

use clap::{Args as ClapArgs, Subcommand};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::world::model::{pretrain, PretrainOptions};
use crate::world::{render, score, Prompt};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: WorldCommand,
}

#[derive(Subcommand, Debug)]
pub enum WorldCommand {
    /// Train the world's base pipeline from scratch with the `sft` objective on rendered images.
    Pretrain(PretrainArgs),
    /// Draw the ground-truth image of a prompt ("three red circles on the left").
    Render(RenderArgs),
    /// Score PNG images against a prompt with every scorer.
    Score(ScoreArgs),
    /// Print every prompt of the grammar (`--held-out`: only the demo's evaluation prompts).
    Prompts {
        #[arg(long)]
        held_out: bool,
    },
}

#[derive(ClapArgs, Debug)]
pub struct PretrainArgs {
    /// The pipeline folder to write.
    #[arg(long, default_value = "models/world")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 3000)]
    pub steps: u64,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 200)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Probability of the empty prompt (classifier-free guidance needs it).
    #[arg(long, default_value_t = 0.1)]
    pub uncond_prob: f32,
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Start from the weights already in --out (new optimizer state).
    #[arg(long)]
    pub resume: bool,
    /// Probability that each attribute of a training caption (count, colour, shape, place) is
    /// wrong, as in web-scraped captions; 0 = exact captions.
    #[arg(long, default_value_t = 0.0)]
    pub caption_noise: f32,
}

#[derive(ClapArgs, Debug)]
pub struct RenderArgs {
    pub prompt: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "render.png")]
    pub out: PathBuf,
}

#[derive(ClapArgs, Debug)]
pub struct ScoreArgs {
    pub prompt: String,
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(args: &Args, device_arg: &str) -> Result<()> {
    match &args.command {
        WorldCommand::Pretrain(a) => run_pretrain(a, device_arg),
        WorldCommand::Render(a) => {
            let p = Prompt::parse(&a.prompt)?;
            let img = render::render(&p, a.seed);
            crate::image_io::write_png(&a.out, &img, Some(&format!("{}\nworld render, seed {}", p.text(), a.seed)))?;
            eprintln!("wrote {}", a.out.display());
            Ok(())
        }
        WorldCommand::Score(a) => {
            let p = Prompt::parse(&a.prompt)?;
            println!("image\t{}\ttask\tall_correct", score::SCORERS.join("\t"));
            for path in &a.images {
                let (img, _) = crate::image_io::read_png(path)?;
                if img.width != crate::world::SIZE || img.height != crate::world::SIZE {
                    return Err(Error::File {
                        path: path.clone(),
                        msg: format!("{}x{} image; the world's scorers read 32x32", img.width, img.height),
                    });
                }
                let s = score::score(&img, &p);
                let cols: Vec<String> =
                    score::SCORERS.iter().map(|n| s.get(n).map(|v| format!("{v:.3}")).unwrap_or("-".into())).collect();
                println!("{}\t{}\t{:.3}\t{}", path.display(), cols.join("\t"), s.task(), s.all_correct());
            }
            Ok(())
        }
        WorldCommand::Prompts { held_out } => {
            for p in Prompt::all().into_iter().filter(|p| !held_out || p.is_held_out()) {
                println!("{}", p.text());
            }
            Ok(())
        }
    }
}

fn run_pretrain(a: &PretrainArgs, device_arg: &str) -> Result<()> {
    let sel = Device::select(device_arg.parse()?)?;
    eprintln!("device: {}", sel.reason);
    let opts = PretrainOptions {
        out: a.out.clone(),
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        seed: a.seed,
        uncond_prob: a.uncond_prob,
        save_every: a.save_every,
        resume: a.resume,
        caption_noise: a.caption_noise,
    };
    let pb = indicatif::ProgressBar::new(a.steps);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "pretrain {bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .map_err(|e| Error::Invalid(e.to_string()))?,
    );
    let mut ema = None::<f64>;
    let log_path = a.out.join("pretrain_log.csv");
    let mut log = String::from("step,loss,lr,seconds\n");
    pretrain(&opts, &sel.device, &mut |s| {
        let e = ema.map_or(s.loss, |e| 0.98 * e + 0.02 * s.loss);
        ema = Some(e);
        pb.set_position(s.step);
        pb.set_message(format!("loss {e:.4} lr {:.2e} {:.2}s/step", s.lr, s.seconds));
        log.push_str(&format!("{},{:.6},{:.3e},{:.4}\n", s.step, s.loss, s.lr, s.seconds));
        if s.step % 100 == 0 {
            let _ = std::fs::write(&log_path, &log);
        }
    })?;
    pb.finish();
    crate::train::config::write_atomic(&log_path, log.as_bytes())?;
    eprintln!("wrote {} (log {})", a.out.display(), log_path.display());
    Ok(())
}
