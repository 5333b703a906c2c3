//! Saving and loading weights: torchvision's names, atomic writes, round trip.

mod common;

use maskrcnn::{Config, MaskRcnn};
use tch::Device;

fn small_config() -> Config {
    let sets: Vec<String> = ["model.backbone_depth=18", "model.num_classes=3"].iter().map(|s| s.to_string()).collect();
    Config::load(None, &sets).unwrap()
}

/// A small random model saved as `w.safetensors` in a fresh folder.
fn saved_small_model() -> (Config, MaskRcnn, tempfile::TempDir, std::path::PathBuf) {
    let config = small_config();
    let model = MaskRcnn::new(&config, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    model.save(&path).unwrap();
    (config, model, dir, path)
}

#[test]
fn saved_weights_use_torchvision_names_and_load_back_identically() {
    let (_, model, dir, path) = saved_small_model();
    assert!(!dir.path().join("w.safetensors.tmp").exists(), "temporary file left behind");
    let names: Vec<String> = tch::Tensor::read_safetensors(&path).unwrap().into_iter().map(|(k, _)| k).collect();
    for expected in [
        "backbone.body.conv1.weight",
        "backbone.body.bn1.running_var",
        "backbone.body.layer1.0.conv1.weight",
        "backbone.body.layer2.0.downsample.0.weight",
        "backbone.fpn.inner_blocks.0.0.weight",
        "backbone.fpn.layer_blocks.3.0.bias",
        "rpn.head.conv.0.0.weight",
        "rpn.head.cls_logits.weight",
        "roi_heads.box_head.fc6.weight",
        "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.mask_head.3.0.weight",
        "roi_heads.mask_predictor.conv5_mask.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias",
    ] {
        assert!(names.iter().any(|n| n == expected), "missing {expected}");
    }
    let mut other = small_config();
    other.seed = 99; // different random init, then overwritten by the file
    let loaded = MaskRcnn::from_weights(&other, &path, Device::Cpu).unwrap();
    let a = model.vs.variables();
    let b = loaded.vs.variables();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after the round trip");
    }
}

#[test]
fn frozen_stages_are_not_trainable() {
    // From scratch (`model.norm = "auto"`, no backbone weights) every stage
    // trains, BatchNorm included, as torchvision without pretrained weights.
    let scratch = MaskRcnn::new(&small_config(), Device::Cpu).unwrap();
    assert!(scratch
        .vs
        .variables()
        .iter()
        .filter(|(k, _)| k.starts_with("backbone.body."))
        .all(|(k, t)| { t.requires_grad() || k.contains("running_") }));
    let mut config = small_config();
    config.model.norm = maskrcnn::config::NormKind::FrozenBn;
    let model = MaskRcnn::new(&config, Device::Cpu).unwrap();
    let trainable = model.vs.trainable_variables().len();
    let frozen: Vec<String> =
        model.vs.variables().into_iter().filter(|(_, t)| !t.requires_grad()).map(|(k, _)| k).collect();
    assert!(trainable > 0);
    // trainable_layers = 3: conv1 and layer1 frozen, layer2..4 train; FrozenBN never trains.
    assert!(frozen.iter().any(|k| k == "backbone.body.conv1.weight"));
    assert!(frozen.iter().any(|k| k == "backbone.body.layer1.0.conv1.weight"));
    assert!(!frozen.iter().any(|k| k == "backbone.body.layer2.0.conv1.weight"));
    assert!(frozen.iter().all(|k| !k.starts_with("roi_heads") && !k.starts_with("rpn") || k.contains("bn")));
    assert!(frozen.iter().any(|k| k == "backbone.body.layer4.0.bn1.weight"));
}

#[test]
fn imagenet_backbone_weights_load_by_torchvision_names() {
    let path = common::fixture_dir().join("resnet18_imagenet_names.safetensors");
    common::run_reference("resnet_weights.py", &["18", path.to_str().unwrap()], &path);
    let mut config = small_config();
    config.model.backbone_weights = path.display().to_string();
    // With ImageNet weights: frozen BN, conv1 and layer1 frozen (seed's recipe).
    assert_eq!((config.norm_kind(), config.trainable_layers()), (maskrcnn::config::NormKind::FrozenBn, 3));
    let model = MaskRcnn::new(&config, Device::Cpu).unwrap();
    maskrcnn::modeling::weights::load_backbone_weights(&model.vs, &path).unwrap();
    let file = tch::Tensor::read_safetensors(&path).unwrap();
    let vars = model.vs.variables();
    let mut compared = 0;
    for (name, t) in &file {
        if name.starts_with("fc.") || name.ends_with("num_batches_tracked") {
            continue;
        }
        let ours = &vars[&format!("backbone.body.{name}")];
        assert!(ours.equal(t), "{name} differs after loading");
        compared += 1;
    }
    assert_eq!(compared, 100, "resnet18: 20 convs and 20 BNs of 4 tensors");
    assert!(!vars["backbone.body.conv1.weight"].requires_grad());
    assert!(vars["backbone.body.layer2.0.conv1.weight"].requires_grad());
    // A file of another depth is refused, naming what does not fit.
    let mut deeper = small_config();
    deeper.model.backbone_depth = 34;
    let other = MaskRcnn::new(&deeper, Device::Cpu).unwrap();
    let e = maskrcnn::modeling::weights::load_backbone_weights(&other.vs, &path).unwrap_err().to_string();
    assert!(e.contains("missing layer") || e.contains("layer3"), "{e}");
}

/// A weights file with an integer tensor or non-finite values is refused at
/// load with the tensor named (integers used to be converted silently into
/// a model scoring nothing; NaN showed up steps later as a "diverging" loss).
#[test]
fn integer_or_non_finite_weights_are_refused_with_the_tensor_named() {
    let (config, _, dir, path) = saved_small_model();
    let tensors = tch::Tensor::read_safetensors(&path).unwrap();
    let rewrite = |name: &str, f: &dyn Fn(&tch::Tensor) -> tch::Tensor| {
        let out = dir.path().join(format!("{}.safetensors", name.replace('.', "_")));
        let named: Vec<(String, tch::Tensor)> =
            tensors.iter().map(|(k, t)| (k.clone(), if k == name { f(t) } else { t.shallow_clone() })).collect();
        tch::Tensor::write_safetensors(&named, &out).unwrap();
        out
    };
    let ints = rewrite("roi_heads.box_predictor.cls_score.weight", &|t| t.to_kind(tch::Kind::Int64));
    let e = MaskRcnn::from_weights(&config, &ints, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("roi_heads.box_predictor.cls_score.weight: dtype Int64"), "{e}");
    let nan = rewrite("backbone.fpn.layer_blocks.0.0.weight", &|t| t.fill(f64::NAN));
    let e = MaskRcnn::from_weights(&config, &nan, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("NaN or infinite") && e.contains("backbone.fpn.layer_blocks.0.0.weight"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

/// Fine-tuning from torchvision's v2 model (`maskrcnn_resnet50_fpn_v2`, COCO's
/// 91 classes, `save_file(model.state_dict())`, BatchNorm buffers with
/// `num_batches_tracked`) with the v2 preset and 7 classes: every tensor but
/// the class-dependent predictors comes from the file, the predictors start
/// fresh at the new size.
#[test]
fn a_v2_checkpoint_fine_tunes_with_another_class_count() {
    let file = common::fixture_dir().join("maskrcnn_r50_fpn_v2_91.safetensors");
    common::run_reference("detection_weights.py", &["50", "91", file.to_str().unwrap(), "--v2"], &file);
    let preset = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/maskrcnn_r50_fpn_v2.toml");
    let sets = ["model.num_classes=7".to_string(), format!("model.weights='{}'", file.display())];
    let config = Config::load(Some(&preset), &sets).unwrap();
    let model = MaskRcnn::new(&config, Device::Cpu).unwrap();
    let classes = maskrcnn::modeling::weights::load_pretrained_model(&model.vs, &file).unwrap();
    assert_eq!(classes, 91);
    common::assert_all_but_predictors_copied(&model.vs, &file, 7);
    let vars = model.vs.variables();
    assert!(vars.contains_key("backbone.fpn.inner_blocks.0.1.running_var"), "the FPN's BatchNorm is loaded");
    assert!(vars.contains_key("roi_heads.box_head.5.weight"), "the 4conv1fc box head is loaded");
}
