//! The label space of a trained model: which dataset category (COCO id and
//! name) each contiguous label stands for. Training on a COCO file maps its
//! categories, sorted by id, to labels 1..=K; the table travels inside the
//! weights file so that `predict` writes the dataset's own category ids and
//! draws names without the annotation file.

use serde::{Deserialize, Serialize};

/// A dataset category: its COCO id and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    pub id: u64,
    pub name: String,
}

/// Categories of a model's labels: label `i + 1` is `self.0[i]`; label 0 is
/// background. Serialized as a JSON list of `{"id", "name"}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Categories(pub Vec<Category>);

impl Categories {
    /// The category of contiguous `label` (1..=K).
    pub fn get(&self, label: i64) -> Option<&Category> {
        usize::try_from(label - 1).ok().and_then(|i| self.0.get(i))
    }

    /// The dataset category id of contiguous `label` (1..=K).
    pub fn category_id(&self, label: i64) -> Option<u64> {
        self.get(label).map(|c| c.id)
    }

    /// Number of object classes including background (`K + 1`).
    pub fn num_classes(&self) -> usize {
        self.0.len() + 1
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ids, in label order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|c| c.id)
    }
}

/// Class names of torchvision's 91-entry COCO label space (index = label).
pub const COCO_CLASS_NAMES: [&str; 91] = [
    "__background__",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// The name of `label` for a model with `num_classes` classes.
pub fn class_name(label: i64, num_classes: usize) -> String {
    if num_classes == 91 {
        if let Some(n) = COCO_CLASS_NAMES.get(label as usize) {
            return n.to_string();
        }
    }
    format!("class {label}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_map_to_ids_and_json_round_trips() {
        let cats = Categories(vec![Category { id: 3, name: "star".into() }, Category { id: 7, name: "ring".into() }]);
        assert_eq!((cats.category_id(1), cats.category_id(2)), (Some(3), Some(7)));
        assert_eq!((cats.category_id(0), cats.category_id(3)), (None, None));
        assert_eq!(cats.get(2).map(|c| c.name.as_str()), Some("ring"));
        assert_eq!(cats.num_classes(), 3);
        let json = serde_json::to_string(&cats).unwrap();
        assert_eq!(json, r#"[{"id":3,"name":"star"},{"id":7,"name":"ring"}]"#);
        assert_eq!(serde_json::from_str::<Categories>(&json).unwrap(), cats);
    }
}
