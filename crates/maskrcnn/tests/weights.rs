//! Saving and loading weights: torchvision's names, atomic writes, round trip.

use maskrcnn::{Config, MaskRcnn};
use tch::Device;

fn small_config() -> Config {
    let sets: Vec<String> = ["model.backbone_depth=18", "model.num_classes=3"].iter().map(|s| s.to_string()).collect();
    Config::load(None, &sets).unwrap()
}

#[test]
fn saved_weights_use_torchvision_names_and_load_back_identically() {
    let config = small_config();
    let model = MaskRcnn::new(&config, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    model.save(&path).unwrap();
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
