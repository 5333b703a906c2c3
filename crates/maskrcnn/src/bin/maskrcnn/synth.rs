//! `maskrcnn synth`: a synthetic COCO-format dataset of shapes.

use crate::args::parse_size;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct SynthArgs {
    /// Output folder: train2017/, val2017/, annotations/instances_{train,val}2017.json.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 200)]
    pub train: usize,
    /// Validation images.
    #[arg(long, default_value_t = 50)]
    pub val: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Each image side is drawn from MIN..=MAX pixels.
    #[arg(long, value_name = "MIN,MAX", default_value = "320,480", value_parser = parse_size)]
    pub size: (u32, u32),
    /// Write only the annotation files (no images, no occlusion): to test
    /// annotation loading at COCO scale.
    #[arg(long)]
    pub annotations_only: bool,
    /// shapes: six shape classes, sides from --size, 1-10 objects (the
    /// demo's data); coco: COCO's 80 categories and ids, image sizes,
    /// object counts and sizes, crowds (--size is not used).
    #[arg(long, value_enum, default_value = "shapes")]
    pub profile: Profile,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Profile {
    Shapes,
    Coco,
}

pub fn run(args: SynthArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let out = maskrcnn::data::synth::generate(&maskrcnn::data::synth::SynthOptions {
        out: args.out.clone(),
        train: args.train,
        val: args.val,
        seed: args.seed,
        size: args.size,
        annotations_only: args.annotations_only,
        profile: match args.profile {
            Profile::Shapes => maskrcnn::data::synth::SynthProfile::Shapes,
            Profile::Coco => maskrcnn::data::synth::SynthProfile::Coco,
        },
    })?;
    eprintln!(
        "{} train + {} val images, {} annotations in {:.1} s: {} {}",
        args.train,
        args.val,
        out.annotations,
        t.elapsed().as_secs_f64(),
        out.train_ann.display(),
        out.val_ann.display()
    );
    println!(
        "--set data.train_ann='{}' --set data.train_images='{}' --set data.val_ann='{}' --set data.val_images='{}'",
        out.train_ann.display(),
        out.train_images.display(),
        out.val_ann.display(),
        out.val_images.display(),
    );
    Ok(())
}
