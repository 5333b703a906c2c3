//! Configuration: defaults, file and --set layers, every validation rule, TOML
//! round trip.

use maskrcnn::config::{AmpMode, AutoCount, Config, ConfigError, MaskOn, NormKind, PixelFormat};
use std::io::Write;

fn load_sets(sets: &[&str]) -> Result<Config, ConfigError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::load(None, &sets)
}

fn load_file(text: &str) -> Result<Config, ConfigError> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    Config::load(Some(f.path()), &[])
}

fn err_of(sets: &[&str]) -> String {
    match load_sets(sets) {
        Ok(_) => panic!("{sets:?} should have been rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn defaults_are_the_r50_fpn_recipe() {
    let c = Config::load(None, &[]).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!((c.model.num_classes, c.model.mask_on), (AutoCount::Auto, MaskOn::Auto), "from the data or weights");
    assert_eq!(c.model.backbone_depth, 50);
    assert_eq!(c.model.trainable_layers, 3);
    assert_eq!(c.model.norm, NormKind::Auto);
    assert_eq!((c.norm_kind(), c.trainable_layers()), (NormKind::Bn, 5), "from scratch: trainable BN, every stage");
    assert_eq!(c.model.fpn_channels, 256);
    assert_eq!(c.input.min_size, vec![800]);
    assert_eq!(c.input.max_size, 1333);
    assert_eq!(c.input.pixel_format, PixelFormat::Rgb);
    assert_eq!(c.input.pixel_mean, vec![0.485, 0.456, 0.406]);
    assert_eq!(c.input.pixel_std, vec![0.229, 0.224, 0.225]);
    assert_eq!(c.input.size_divisibility, 32);
    assert_eq!(c.input.flip_prob, 0.5);
    assert_eq!(c.rpn.anchor_sizes, vec![32.0, 64.0, 128.0, 256.0, 512.0]);
    assert_eq!(c.rpn.aspect_ratios, vec![0.5, 1.0, 2.0]);
    assert_eq!((c.rpn.fg_iou_thresh, c.rpn.bg_iou_thresh), (0.7, 0.3));
    assert_eq!((c.rpn.batch_size_per_image, c.rpn.positive_fraction), (256, 0.5));
    assert_eq!((c.rpn.pre_nms_top_n_train, c.rpn.pre_nms_top_n_test), (2000, 1000));
    assert_eq!((c.rpn.post_nms_top_n_train, c.rpn.post_nms_top_n_test), (2000, 1000));
    assert_eq!(c.rpn.nms_thresh, 0.7);
    assert_eq!((c.roi_heads.fg_iou_thresh, c.roi_heads.bg_iou_thresh), (0.5, 0.5));
    assert_eq!((c.roi_heads.batch_size_per_image, c.roi_heads.positive_fraction), (512, 0.25));
    assert_eq!(c.roi_heads.bbox_reg_weights, vec![10.0, 10.0, 5.0, 5.0]);
    assert_eq!((c.roi_heads.score_thresh, c.roi_heads.nms_thresh), (0.05, 0.5));
    assert_eq!(c.roi_heads.detections_per_img, 100);
    assert_eq!((c.roi_heads.box_pooler_resolution, c.roi_heads.mask_pooler_resolution), (7, 14));
    assert_eq!((c.roi_heads.sampling_ratio, c.roi_heads.mask_resolution), (2, 28));
    assert_eq!((c.solver.momentum, c.solver.weight_decay, c.solver.gamma), (0.9, 1e-4, 0.1));
    assert_eq!((c.solver.ims_per_batch, c.solver.reference_batch, c.solver.base_lr), (16, 16, 0.02));
    // The seed's 60k/80k of 90k, as fractions of whatever max_iter is.
    assert_eq!((c.solver.max_iter, c.solver.steps.clone()), (90_000, vec![]));
    assert_eq!(c.solver.resolved(118_287).steps, vec![60_000, 80_000]);
    assert_eq!(c.test.ims_per_batch, 8);
    assert_eq!(c.precision.amp, AmpMode::Auto);
    assert_eq!(c.dataloader.workers, AutoCount::Auto);
}

/// `--set solver.max_iter=N` alone is a valid short run (the steps follow
/// it); epochs give max_iter from the data; the learning rate follows the
/// batch (linear scaling from solver.reference_batch).
#[test]
fn the_schedule_follows_max_iter_epochs_and_the_batch() {
    let c = load_sets(&["solver.max_iter=300"]).unwrap();
    assert_eq!(c.solver.resolved(1000).steps, vec![200, 267]);
    let c = load_sets(&["solver.epochs=12", "solver.ims_per_batch=8"]).unwrap();
    let s = c.solver.resolved(1001);
    assert_eq!((s.max_iter, s.steps.clone()), (1502, vec![1001, 1335]));
    assert!((s.effective_lr() - 0.01).abs() < 1e-15, "0.02 for 16 images -> 0.01 for 8");
    let c = load_sets(&["solver.max_iter=100", "solver.step_fractions=[]"]).unwrap();
    assert!(c.solver.resolved(10).steps.is_empty());
    let c = load_sets(&["solver.max_iter=100", "solver.steps=[30]"]).unwrap();
    assert_eq!(c.solver.resolved(10).steps, vec![30]);
    let e = load_sets(&["solver.step_fractions=[0.9, 0.5]"]).unwrap_err().to_string();
    assert!(e.contains("solver.step_fractions"), "{e}");
    let c = load_sets(&["dataloader.workers=3", "precision.amp=auto"]).unwrap();
    assert_eq!((c.dataloader.worker_count(), c.precision.amp.on(tch::Device::Cpu)), (3, AmpMode::Off));
    assert!(Config::default().dataloader.worker_count() >= 1);
}

#[test]
fn toml_round_trip_of_defaults_and_a_changed_config() {
    let text = Config::default().to_toml();
    assert_eq!(load_file(&text).unwrap(), Config::default());

    let changed = load_sets(&[
        "model.num_classes=7",
        "model.backbone_depth=101",
        "input.min_size=[480, 512, 544]",
        "input.max_size=683",
        "precision.amp=bf16",
        "rpn.post_nms_top_n_scope=batch",
        "solver.base_lr=0.0025",
        "data.train_ann=/data/coco/annotations/instances_train2017.json",
        "seed=42",
    ])
    .unwrap();
    let again = load_file(&changed.to_toml()).unwrap();
    assert_eq!(again, changed);
    assert_eq!(again.input.min_size, vec![480, 512, 544]);
    assert_eq!(again.precision.amp, AmpMode::Bf16);
    assert_eq!(again.seed, 42);
}

#[test]
fn file_then_overrides_apply_in_order() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    writeln!(f, "[solver]\nbase_lr = 0.01\nmax_iter = 100\nsteps = [50, 80]\n[model]\nnum_classes = 7").unwrap();
    let sets = vec!["solver.base_lr=0.005".to_string(), "solver.base_lr=0.004".to_string()];
    let c = Config::load(Some(f.path()), &sets).unwrap();
    assert_eq!(c.solver.base_lr, 0.004);
    assert_eq!(c.solver.max_iter, 100);
    assert_eq!(c.model.num_classes, AutoCount::Fixed(7));
    // untouched keys keep their defaults
    assert_eq!(c.solver.momentum, 0.9);
}

#[test]
fn overrides_coerce_ints_to_floats_and_scalars_to_lists() {
    let c = load_sets(&["solver.base_lr=1", "input.min_size=512", "input.max_size=683"]).unwrap();
    assert_eq!(c.solver.base_lr, 1.0);
    assert_eq!(c.input.min_size, vec![512]);
    let c = load_sets(&["precision.amp=\"fp16\"", "precision.tf32=false"]).unwrap();
    assert_eq!(c.precision.amp, AmpMode::Fp16);
    assert!(!c.precision.tf32);
}

#[test]
fn unknown_keys_name_the_key_and_closest_valid_ones() {
    let e = err_of(&["solver.base_lrr=0.1"]);
    assert!(e.contains("unknown config key `solver.base_lrr`"), "{e}");
    assert!(e.contains("`solver.base_lr`"), "{e}");
    let e = err_of(&["rpn.base_lr=0.1"]);
    assert!(e.contains("did you mean `solver.base_lr`"), "{e}");
    let e = err_of(&["modle.num_classes=3"]);
    assert!(e.contains("`model.num_classes`"), "{e}");
    let e = load_file("[solver]\nlr = 0.1\n").unwrap_err().to_string();
    assert!(e.starts_with("config file "), "{e}");
    assert!(e.contains("unknown config key `solver.lr`"), "{e}");
    let e = load_file("[nonsense]\nx = 1\n").unwrap_err().to_string();
    assert!(e.contains("`nonsense.x`"), "{e}");
}

#[test]
fn wrong_types_name_the_key_and_the_expected_type() {
    let e = err_of(&["solver.base_lr=abc"]);
    assert!(e.contains("`solver.base_lr`") && e.contains("expected a number"), "{e}");
    let e = err_of(&["model.num_classes=2.5"]);
    assert!(e.contains("`model.num_classes`") && e.contains("expected \"auto\" or a count"), "{e}");
    let e = err_of(&["precision.tf32=yes"]);
    assert!(e.contains("`precision.tf32`") && e.contains("expected a boolean"), "{e}");
    let e = err_of(&["input.min_size=[800, \"x\"]"]);
    assert!(e.contains("`input.min_size`") && e.contains("list of integers"), "{e}");
    let e = err_of(&["solver=3"]);
    assert!(e.contains("`solver`") && e.contains("expected a table"), "{e}");
    let e = err_of(&["precision.amp=fp8"]);
    assert!(e.contains("`precision.amp`") && e.contains("fp16"), "{e}");
    let e = err_of(&["solver.max_iter=-5"]);
    assert!(e.contains("`solver.max_iter`") && e.contains("non-negative integer"), "{e}");
}

#[test]
fn malformed_overrides_and_files_are_reported() {
    assert!(err_of(&["solver.base_lr"]).contains("expected section.key=value"));
    let e = load_file("[solver\nbase_lr = 1").unwrap_err().to_string();
    assert!(e.starts_with("config file") && !e.contains('\n'), "{e}");
    let e = Config::load(Some(std::path::Path::new("/nonexistent/x.toml")), &[]).unwrap_err().to_string();
    assert!(e.contains("cannot read config file /nonexistent/x.toml"), "{e}");
}

/// Every rule of `Config::validate`, each broken once.
#[test]
fn every_validation_rule_names_its_key() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&["model.num_classes=1"], "model.num_classes", ">= 2"),
        (&["model.backbone_depth=42"], "model.backbone_depth", "one of 18, 34, 50, 101, 152"),
        (&["model.trainable_layers=6"], "model.trainable_layers", "0..=5"),
        (&["model.fpn_channels=0"], "model.fpn_channels", "> 0"),
        (&["input.min_size=[]"], "input.min_size", "at least one"),
        (&["input.min_size=[0]"], "input.min_size", "> 0"),
        (&["input.max_size=0"], "input.max_size", "> 0"),
        (&["input.min_size=1400"], "input.min_size", "<= input.max_size"),
        (&["input.min_size_test=0"], "input.min_size_test", "> 0"),
        (&["input.min_size_test=2000"], "input.min_size_test", "<= input.max_size_test"),
        (&["input.pixel_mean=[1.0, 2.0]"], "input.pixel_mean", "3 values"),
        (&["input.pixel_std=[1.0]"], "input.pixel_std", "3 values"),
        (&["input.pixel_mean=[nan, 0.0, 0.0]"], "input.pixel_mean", "finite"),
        (&["input.pixel_std=[1.0, 0.0, 1.0]"], "input.pixel_std", "> 0"),
        (&["input.size_divisibility=0"], "input.size_divisibility", ">= 1"),
        (&["input.flip_prob=1.5"], "input.flip_prob", "[0, 1]"),
        (&["rpn.anchor_sizes=[]"], "rpn.anchor_sizes", "5 sizes"),
        (&["rpn.anchor_sizes=[32, 64, 128, 256]"], "rpn.anchor_sizes", "5 sizes"),
        (&["rpn.anchor_sizes=[32, 64, 0, 256, 512]"], "rpn.anchor_sizes", "> 0"),
        (&["rpn.aspect_ratios=[]"], "rpn.aspect_ratios", "at least one"),
        (&["rpn.aspect_ratios=[-1.0]"], "rpn.aspect_ratios", "> 0"),
        (&["rpn.fg_iou_thresh=1.2"], "rpn.fg_iou_thresh", "[0, 1]"),
        (&["rpn.bg_iou_thresh=-0.1"], "rpn.bg_iou_thresh", "[0, 1]"),
        (&["rpn.bg_iou_thresh=0.8"], "rpn.bg_iou_thresh", "<= rpn.fg_iou_thresh"),
        (&["rpn.batch_size_per_image=0"], "rpn.batch_size_per_image", "> 0"),
        (&["rpn.positive_fraction=2"], "rpn.positive_fraction", "[0, 1]"),
        (&["rpn.pre_nms_top_n_train=0"], "rpn.pre_nms_top_n_train", "> 0"),
        (&["rpn.pre_nms_top_n_test=0"], "rpn.pre_nms_top_n_test", "> 0"),
        (&["rpn.post_nms_top_n_train=0"], "rpn.post_nms_top_n_train", "> 0"),
        (&["rpn.post_nms_top_n_test=0"], "rpn.post_nms_top_n_test", "> 0"),
        (&["rpn.nms_thresh=1.01"], "rpn.nms_thresh", "[0, 1]"),
        (&["rpn.min_box_size=-1"], "rpn.min_box_size", ">= 0"),
        (&["rpn.score_thresh=-0.5"], "rpn.score_thresh", "[0, 1]"),
        (&["roi_heads.fg_iou_thresh=1.5"], "roi_heads.fg_iou_thresh", "[0, 1]"),
        (&["roi_heads.bg_iou_thresh=0.6"], "roi_heads.bg_iou_thresh", "<= roi_heads.fg_iou_thresh"),
        (&["roi_heads.batch_size_per_image=0"], "roi_heads.batch_size_per_image", "> 0"),
        (&["roi_heads.positive_fraction=-0.25"], "roi_heads.positive_fraction", "[0, 1]"),
        (&["roi_heads.bbox_reg_weights=[10.0, 10.0, 5.0]"], "roi_heads.bbox_reg_weights", "4 values"),
        (&["roi_heads.bbox_reg_weights=[10.0, 10.0, 5.0, 0.0]"], "roi_heads.bbox_reg_weights", "> 0"),
        (&["roi_heads.score_thresh=2"], "roi_heads.score_thresh", "[0, 1]"),
        (&["roi_heads.nms_thresh=-1"], "roi_heads.nms_thresh", "[0, 1]"),
        (&["roi_heads.detections_per_img=0"], "roi_heads.detections_per_img", "> 0"),
        (&["roi_heads.representation_size=0"], "roi_heads.representation_size", "> 0"),
        (&["roi_heads.box_pooler_resolution=0"], "roi_heads.box_pooler_resolution", "> 0"),
        (&["roi_heads.mask_pooler_resolution=0"], "roi_heads.mask_pooler_resolution", "> 0"),
        (&["roi_heads.mask_resolution=14"], "roi_heads.mask_resolution", "twice"),
        (&["solver.base_lr=-0.02"], "solver.base_lr", "> 0"),
        (&["solver.base_lr=0"], "solver.base_lr", "> 0"),
        (&["solver.momentum=1.0"], "solver.momentum", "[0, 1)"),
        (&["solver.weight_decay=-1e-4"], "solver.weight_decay", ">= 0"),
        (&["solver.bias_lr_factor=0"], "solver.bias_lr_factor", "> 0"),
        (&["solver.bias_weight_decay=-1"], "solver.bias_weight_decay", ">= 0"),
        (&["solver.warmup_factor=0"], "solver.warmup_factor", "(0, 1]"),
        (&["solver.gamma=0"], "solver.gamma", "> 0"),
        (&["solver.max_iter=0", "solver.steps=[]"], "solver.max_iter", "> 0"),
        (&["solver.steps=[80000, 60000]"], "solver.steps", "strictly increasing"),
        (&["solver.steps=[60000, 100000]"], "solver.steps", "1..=solver.max_iter"),
        (&["solver.ims_per_batch=0"], "solver.ims_per_batch", "> 0"),
        (&["solver.accumulate_steps=0"], "solver.accumulate_steps", ">= 1"),
        (&["solver.accumulate_steps=3"], "solver.ims_per_batch", "divisible by solver.accumulate_steps"),
        (&["solver.checkpoint_period=0"], "solver.checkpoint_period", "> 0"),
        (&["dataloader.prefetch=0"], "dataloader.prefetch", ">= 1"),
        (&["test.ims_per_batch=0"], "test.ims_per_batch", ">= 1"),
    ];
    for (sets, key, rule) in cases {
        let e = err_of(sets);
        assert!(e.contains(&format!("`{key}`")), "{sets:?}: error should name `{key}`: {e}");
        assert!(e.contains(rule), "{sets:?}: error should state the rule '{rule}': {e}");
    }
}

#[test]
fn keys_lists_every_leaf() {
    let keys = Config::keys();
    assert!(keys.contains(&"seed".to_string()));
    assert!(keys.contains(&"solver.base_lr".to_string()));
    assert!(keys.contains(&"data.val_images".to_string()));
    assert!(keys.iter().all(|k| !k.ends_with('.')));
    assert!(keys.len() > 60, "{}", keys.len());
}

/// The v2 preset sets every v2 part and nothing else.
#[test]
fn the_v2_preset_sets_torchvisions_v2_parts() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/maskrcnn_r50_fpn_v2.toml");
    let v2 = Config::load(Some(&path), &[]).unwrap();
    let m = &v2.model;
    assert_eq!(
        (m.fpn_norm, m.rpn_conv_depth, m.box_head, m.head_norm),
        (
            maskrcnn::config::FpnNorm::Bn,
            2,
            maskrcnn::config::BoxHeadKind::FourConvOneFc,
            maskrcnn::config::HeadNorm::Bn
        )
    );
    let mut v1 = v2.clone();
    v1.model = maskrcnn::config::ModelConfig::default();
    assert_eq!(v1, Config::default(), "the preset changes only the v2 parts");
}

/// A config built in code that `Config::load` would refuse is refused by
/// the model too (an error naming the key, not a panic at the first batch).
#[test]
fn a_model_refuses_an_invalid_config_built_in_code() {
    let mut config = Config::default();
    config.input.min_size.clear();
    let Err(err) = maskrcnn::MaskRcnn::new(&config, tch::Device::Cpu) else {
        panic!("an empty input.min_size built a model")
    };
    let err = err.to_string();
    assert!(err.contains("input.min_size"), "{err}");
}

/// Keys that take "auto" or a value accept either from `--set` and files,
/// print resolved values as plain numbers and booleans, and load back.
#[test]
fn auto_keys_take_auto_or_a_value() {
    let load = |sets: &[&str]| Config::load(None, &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let c = load(&["model.num_classes=81", "model.mask_on=false"]).unwrap();
    assert_eq!((c.model.num_classes, c.model.mask_on), (AutoCount::Fixed(81), MaskOn::Off));
    let text = c.to_toml();
    assert!(text.contains("num_classes = 81") && text.contains("mask_on = false"), "{text}");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(f, "{text}").unwrap();
    assert_eq!(Config::load(Some(f.path()), &[]).unwrap(), c);
    let c = load(&["model.num_classes=auto", "model.mask_on=\"true\""]).unwrap();
    assert_eq!((c.model.num_classes, c.model.mask_on), (AutoCount::Auto, MaskOn::On));
    assert!(Config::default().to_toml().contains("num_classes = \"auto\""));
    for (set, expected) in [
        ("model.num_classes=1", "must be >= 2"),
        ("model.num_classes=many", "expected \"auto\" or a count"),
        ("model.mask_on=maybe", "expected \"auto\", true or false"),
    ] {
        let e = load(&[set]).unwrap_err().to_string();
        assert!(e.contains(expected) && e.contains("model."), "{set}: {e}");
    }
}
