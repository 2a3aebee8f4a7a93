//! `vipo demo`: Poly-DPO on the built-in world, end to end, from the shipped base model.

use std::path::PathBuf;

use clap::Args as ClapArgs;

use crate::device::Device;
use crate::error::Result;
use crate::train::config::FinetuneKind;
use crate::world::demo::{run_demo, Bars, DemoOptions};
use crate::world::prefs::Regime;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The base pipeline (default: the shipped `models/world`, made by `vipo world pretrain`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the report, grid, curves, data and checkpoint go.
    #[arg(long, default_value = "vipo-demo")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "clean")]
    pub regime: Regime,
    /// Poly-DPO's alpha (0 = Diffusion-DPO) [default: 0].
    #[arg(long, allow_hyphen_values = true)]
    pub alpha: Option<f64>,
    /// The DPO beta [default: 5000].
    #[arg(long)]
    pub beta: Option<f64>,
    /// What is trained [default: lora (rank 8 on attention and feed-forward)].
    #[arg(long, value_enum)]
    pub finetune: Option<FinetuneKind>,
    /// Learning rate [default: 3e-3].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Optimizer steps [default: 250; --quick: 4].
    #[arg(long)]
    pub steps: Option<u64>,
    /// Pairs per step [default: 8; --quick: 2].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Training prompts sampled for the preference set [default: 96; --quick: 8].
    #[arg(long)]
    pub train_prompts: Option<usize>,
    /// Samples per training prompt [default: 4].
    #[arg(long)]
    pub per_prompt: Option<usize>,
    /// Seeds per held-out prompt in the before/after scores [default: 5; --quick: 1].
    #[arg(long)]
    pub eval_seeds: Option<usize>,
    /// Keep a clean pair only when a task scorer prefers the winner by at least this much (and
    /// none is against); 0: every agreed pair. Noisy labels are not filtered [default: 0.5].
    #[arg(long)]
    pub min_gap: Option<f64>,
    /// Denoising steps per sample [default: 10; --quick: 4].
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Classifier-free guidance scale [default: 3].
    #[arg(long)]
    pub guidance: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A few steps and images: all the output files in seconds (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// The alpha ablation instead: every regime x alpha x seed, a table (sweep.md) and a plot (sweep.png).
    #[arg(long)]
    pub sweep: bool,
    /// Sweep: the alphas.
    #[arg(long, value_delimiter = ',', default_value = "-1,-0.5,0,0.5,1,2", allow_hyphen_values = true)]
    pub alphas: Vec<f64>,
    /// Sweep: the training seeds.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    pub seeds: Vec<u64>,
    /// Sweep: the regimes.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "clean,noisy,trivial")]
    pub regimes: Vec<Regime>,
}

macro_rules! set {
    ($o:ident, $a:ident, $($f:ident),*) => { $( if let Some(v) = $a.$f { $o.$f = v; } )* };
}

pub fn options(a: &Args, device_arg: &str) -> Result<DemoOptions> {
    let model = match &a.model {
        Some(m) => m.clone(),
        None => crate::world::model::shipped_dir()?,
    };
    let mut o = DemoOptions { model, out: a.out.clone(), regime: a.regime, seed: a.seed, ..DemoOptions::default() };
    if a.quick {
        o = o.quick();
    }
    set!(o, a, alpha, beta, finetune, lr, steps, batch, train_prompts, per_prompt, eval_seeds, min_gap);
    if !o.min_gap.is_finite() || o.min_gap < 0.0 {
        return Err(crate::error::Error::Invalid(format!(
            "demo: --min-gap must be finite and at least 0, got {}",
            o.min_gap
        )));
    }
    if let Some(s) = a.sample_steps {
        o.sample.steps = s;
    }
    if let Some(g) = a.guidance {
        o.sample.guidance = g;
    }
    o.device_name = device_arg.to_string();
    Ok(o)
}

pub fn run(a: &Args, device_arg: &str) -> Result<()> {
    let sel = Device::select(device_arg.parse()?)?;
    eprintln!("device: {}", sel.reason);
    let o = options(a, device_arg)?;
    let t0 = std::time::Instant::now();
    if a.sweep {
        let r = crate::world::demo::run_sweep(&o, &a.regimes, &a.alphas, &a.seeds, &sel.device, &mut Bars::new(3))?;
        println!(
            "\nsweep finished in {:.0} s: {}, {}, {}",
            r.seconds,
            o.out.join("sweep.md").display(),
            o.out.join("sweep.png").display(),
            o.out.join("sweep.json").display()
        );
        print!("{}", std::fs::read_to_string(o.out.join("sweep.md")).unwrap_or_default());
        return Ok(());
    }
    let report = run_demo(&o, &sel.device, &mut Bars::new(4))?;
    println!();
    println!(
        "Poly-DPO (alpha {}) on {} {} pairs from the base model's own samples, {} steps; {} held-out images, \
         same prompts and seeds before and after:",
        report.alpha,
        report.pairs,
        report.regime.name(),
        report.steps,
        report.eval_images
    );
    println!();
    print!("{}", crate::world::demo::rows_markdown(&report.rows));
    if let Some(a) = report.noisy_agreement {
        println!(
            "\nall scorers agree on {:.1}% of the same candidates' noisy pairs (ViPO: 20.79% on Pick-a-Pic)",
            100.0 * a
        );
    }
    println!("\nfinished in {:.0} s; files:", t0.elapsed().as_secs_f64());
    for f in &report.files {
        println!("  {}", f.display());
    }
    Ok(())
}
