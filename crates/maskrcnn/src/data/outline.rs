//! Outlines of binary masks as COCO polygons, as an annotation tool writes
//! a region: each 4-connected part one polygon along the pixel edges,
//! simplified to within a tolerance; a hole joined to its part's outline by
//! a zero-width cut (COCO's rasterizer fills by parity, so the cut's two
//! sides cancel and the hole stays empty).

/// The polygons (`[x0, y0, x1, y1, ...]`, pixel-edge coordinates as COCO's:
/// pixel `(x, y)` spans `x..x + 1`, `y..y + 1`) outlining the row-major
/// {0, 1} mask `mask` of `h`×`w`, each vertex within `tolerance` pixels of
/// the exact outline. Parts of fewer than `min_pixels` pixels are left out
/// (the largest part is kept whatever its size). Empty for an empty mask.
pub fn mask_polygons(mask: &[u8], h: usize, w: usize, tolerance: f64, min_pixels: usize) -> Vec<Vec<f64>> {
    let (labels, sizes) = components(mask, h, w);
    if sizes.is_empty() {
        return Vec::new();
    }
    let largest = (0..sizes.len()).max_by_key(|&c| sizes[c]).unwrap_or(0);
    let keep: Vec<bool> = (0..sizes.len()).map(|c| c == largest || sizes[c] >= min_pixels).collect();
    // Per part: its outline (the loop of largest area) and its holes.
    let mut loops: Vec<Vec<(i64, Ring)>> = vec![Vec::new(); sizes.len()];
    for (part, points) in boundary_loops(&labels, h, w) {
        if keep[part] {
            let area = shoelace(&points);
            loops[part].push((area.abs().round() as i64, points));
        }
    }
    let mut out = Vec::new();
    for mut part in loops {
        part.sort_by_key(|(area, _)| std::cmp::Reverse(*area));
        let mut rings = part.into_iter().map(|(_, p)| simplify_loop(&p, tolerance));
        let Some(mut outline) = rings.next() else { continue };
        for hole in rings {
            join_hole(&mut outline, &hole);
        }
        out.push(outline.iter().flat_map(|&(x, y)| [x, y]).collect());
    }
    out
}

/// A closed loop of vertices `(x, y)`.
type Ring = Vec<(f64, f64)>;

/// 4-connected parts of the mask: each pixel's part (`usize::MAX` for
/// background) and each part's pixel count.
fn components(mask: &[u8], h: usize, w: usize) -> (Vec<usize>, Vec<usize>) {
    let mut labels = vec![usize::MAX; h * w];
    let mut sizes = Vec::new();
    let mut stack = Vec::new();
    for start in 0..h * w {
        if mask[start] == 0 || labels[start] != usize::MAX {
            continue;
        }
        let part = sizes.len();
        let mut count = 0;
        labels[start] = part;
        stack.push(start);
        while let Some(i) = stack.pop() {
            count += 1;
            let (y, x) = (i / w, i % w);
            let neighbours = [
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
            ];
            for j in neighbours.into_iter().flatten() {
                if mask[j] != 0 && labels[j] == usize::MAX {
                    labels[j] = part;
                    stack.push(j);
                }
            }
        }
        sizes.push(count);
    }
    (labels, sizes)
}

/// The closed loops of pixel edges between each part and the rest, each
/// with its part: every foreground pixel's sides that face another part or
/// the background, walked clockwise around the pixel (on screen, y down),
/// so that a part's outline runs clockwise and its holes anticlockwise. At a
/// corner where two parts touch diagonally the walk keeps to its pixel.
fn boundary_loops(labels: &[usize], h: usize, w: usize) -> Vec<(usize, Ring)> {
    let corner = |x: usize, y: usize| y * (w + 1) + x;
    let same = |part: usize, x: isize, y: isize| {
        x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < h && labels[y as usize * w + x as usize] == part
    };
    // Side k of a pixel is its top, right, bottom, left edge (clockwise,
    // each starting where the previous ends); `edge_of[4 * pixel + k]` is
    // that side's edge when it is open. Edges: (from corner, to corner, pixel, side).
    const NONE: usize = usize::MAX;
    let mut edge_of = vec![NONE; 4 * h * w];
    let mut edges: Vec<(usize, usize, usize, usize)> = Vec::new();
    // At most two edges leave a corner (two parts touching diagonally).
    let mut leaving = vec![[NONE; 2]; (h + 1) * (w + 1)];
    for y in 0..h {
        for x in 0..w {
            let pixel = y * w + x;
            let part = labels[pixel];
            if part == NONE {
                continue;
            }
            let (xi, yi) = (x as isize, y as isize);
            let sides = [
                (!same(part, xi, yi - 1), corner(x, y), corner(x + 1, y)),
                (!same(part, xi + 1, yi), corner(x + 1, y), corner(x + 1, y + 1)),
                (!same(part, xi, yi + 1), corner(x + 1, y + 1), corner(x, y + 1)),
                (!same(part, xi - 1, yi), corner(x, y + 1), corner(x, y)),
            ];
            for (k, (open, a, b)) in sides.into_iter().enumerate() {
                if open {
                    edge_of[4 * pixel + k] = edges.len();
                    let slot = if leaving[a][0] == NONE { 0 } else { 1 };
                    leaving[a][slot] = edges.len();
                    edges.push((a, b, pixel, k));
                }
            }
        }
    }
    let point = |c: usize| ((c % (w + 1)) as f64, (c / (w + 1)) as f64);
    let mut used = vec![false; edges.len()];
    let mut loops = Vec::new();
    for first in 0..edges.len() {
        if used[first] {
            continue;
        }
        let mut points = Vec::new();
        let mut e = first;
        while !used[e] {
            used[e] = true;
            let (a, b, pixel, k) = edges[e];
            points.push(point(a));
            // The pixel's next side when open (so at a corner where parts
            // touch diagonally the walk keeps to its pixel), else the one
            // edge leaving the corner.
            let own = edge_of[4 * pixel + (k + 1) % 4];
            e = if own != NONE {
                own
            } else {
                leaving[b].into_iter().find(|&s| s != NONE && !used[s]).unwrap_or(first)
            };
        }
        loops.push((labels[edges[first].2], points));
    }
    loops
}

/// The signed area of a closed polygon (shoelace formula).
fn shoelace(points: &[(f64, f64)]) -> f64 {
    let n = points.len();
    (0..n)
        .map(|i| {
            let (a, b) = (points[i], points[(i + 1) % n]);
            a.0 * b.1 - b.0 * a.1
        })
        .sum::<f64>()
        / 2.0
}

/// A closed loop with its vertices thinned by Douglas–Peucker to within
/// `tolerance` (collinear ones always go); at least a triangle is kept.
fn simplify_loop(points: &[(f64, f64)], tolerance: f64) -> Vec<(f64, f64)> {
    let n = points.len();
    if n <= 3 {
        return points.to_vec();
    }
    // Split at the vertex farthest from the first: two open chains.
    let far =
        (1..n).max_by(|&i, &j| dist2(points[0], points[i]).total_cmp(&dist2(points[0], points[j]))).unwrap_or(n / 2);
    let mut keep = vec![false; n];
    keep[0] = true;
    keep[far] = true;
    let chain_a: Vec<usize> = (0..=far).collect();
    let chain_b: Vec<usize> = (far..n).chain(std::iter::once(0)).collect();
    for chain in [chain_a, chain_b] {
        douglas_peucker(points, &chain, tolerance.max(1e-9), &mut keep);
    }
    let simplified: Vec<(f64, f64)> = (0..n).filter(|&i| keep[i]).map(|i| points[i]).collect();
    if simplified.len() >= 3 {
        simplified
    } else {
        points.to_vec()
    }
}

/// Marks in `keep` the vertices of the open chain `chain` (indices into
/// `points`) that Douglas–Peucker keeps at `tolerance`.
fn douglas_peucker(points: &[(f64, f64)], chain: &[usize], tolerance: f64, keep: &mut [bool]) {
    if chain.len() < 3 {
        return;
    }
    let (a, b) = (points[chain[0]], points[chain[chain.len() - 1]]);
    let (k, d) = chain[1..chain.len() - 1]
        .iter()
        .enumerate()
        .map(|(k, &i)| (k + 1, segment_distance(points[i], a, b)))
        .fold((0, -1.0), |best, cur| if cur.1 > best.1 { cur } else { best });
    if d > tolerance {
        keep[chain[k]] = true;
        douglas_peucker(points, &chain[..=k], tolerance, keep);
        douglas_peucker(points, &chain[k..], tolerance, keep);
    }
}

fn dist2(a: (f64, f64), b: (f64, f64)) -> f64 {
    (a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)
}

/// Distance from `p` to the segment `a`–`b`.
fn segment_distance(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    if len2 == 0.0 {
        return dist2(p, a).sqrt();
    }
    let t = (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0);
    dist2(p, (a.0 + t * dx, a.1 + t * dy)).sqrt()
}

/// Joins `hole` into `outline` by a zero-width cut from the outline's
/// vertex nearest to the hole's first vertex: out along the cut, round the
/// hole, back along the cut.
fn join_hole(outline: &mut Vec<(f64, f64)>, hole: &[(f64, f64)]) {
    let Some(&start) = hole.first() else { return };
    let k =
        (0..outline.len()).min_by(|&i, &j| dist2(outline[i], start).total_cmp(&dist2(outline[j], start))).unwrap_or(0);
    let mut spliced: Vec<(f64, f64)> = hole.to_vec();
    spliced.push(start);
    spliced.push(outline[k]);
    outline.splice(k + 1..k + 1, spliced);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polygons rasterized by COCO's rasterizer (hotcoco's port), row-major.
    fn raster(polys: &[Vec<f64>], h: usize, w: usize) -> Vec<u8> {
        let rle = hotcoco::mask::fr_polys(polys, h as u32, w as u32).expect("polygons");
        let mut m = vec![0u8; h * w];
        crate::structures::rle::rle_into_bitmap(&rle, &mut m, false);
        m
    }

    fn iou(a: &[u8], b: &[u8]) -> f64 {
        let inter = a.iter().zip(b).filter(|(&x, &y)| x != 0 && y != 0).count();
        let union = a.iter().zip(b).filter(|(&x, &y)| x != 0 || y != 0).count();
        inter as f64 / union.max(1) as f64
    }

    fn disc(h: usize, w: usize, cx: f64, cy: f64, r: f64, hole: f64) -> Vec<u8> {
        (0..h * w)
            .map(|i| {
                let d = (((i % w) as f64 + 0.5 - cx).powi(2) + ((i / w) as f64 + 0.5 - cy).powi(2)).sqrt();
                u8::from(d <= r && d >= hole)
            })
            .collect()
    }

    /// Without simplification COCO's rasterizer gives back the mask exactly;
    /// with a pixel's tolerance nearly so (IoU 0.97), with far fewer vertices.
    #[test]
    fn outlines_rasterize_back_to_the_mask() {
        let (h, w) = (60, 80);
        let mask = disc(h, w, 30.0, 28.0, 20.0, 0.0);
        let exact = mask_polygons(&mask, h, w, 0.0, 1);
        assert_eq!(exact.len(), 1);
        assert!(raster(&exact, h, w) == mask, "the exact outline rasterizes to other pixels");
        let simple = mask_polygons(&mask, h, w, 1.0, 1);
        assert!(simple[0].len() < exact[0].len() / 3, "{} vs {}", simple[0].len(), exact[0].len());
        assert!(iou(&raster(&simple, h, w), &mask) > 0.93);
    }

    /// A ring's hole stays empty (the zero-width cut), and separate parts
    /// are separate polygons; parts below `min_pixels` go.
    #[test]
    fn holes_stay_empty_and_parts_separate() {
        let (h, w) = (64, 96);
        let mut mask = disc(h, w, 30.0, 32.0, 24.0, 10.0);
        for (i, v) in disc(h, w, 80.0, 20.0, 8.0, 0.0).into_iter().enumerate() {
            mask[i] |= v;
        }
        mask[60 * w + 90] = 1; // one stray pixel
        let polys = mask_polygons(&mask, h, w, 0.5, 4);
        assert_eq!(polys.len(), 2, "ring and disc; the stray pixel left out");
        let back = raster(&polys, h, w);
        assert_eq!(back[32 * w + 30], 0, "the ring's hole is filled");
        assert_eq!(back[32 * w + 30 + 17], 1);
        assert_eq!(back[20 * w + 80], 1);
        let expected: Vec<u8> = mask.iter().enumerate().map(|(i, &v)| if i == 60 * w + 90 { 0 } else { v }).collect();
        assert!(iou(&back, &expected) > 0.9, "iou {}", iou(&back, &expected));
    }

    /// Two pixels touching at a corner are two parts (4-connectivity), and
    /// the walk round each stays on its own pixel.
    #[test]
    fn diagonal_neighbours_are_separate_parts() {
        let mask = [1, 0, 0, 1];
        let polys = mask_polygons(&mask, 2, 2, 0.0, 1);
        assert_eq!(polys.len(), 2);
        for p in &polys {
            assert_eq!(p.len(), 8, "a unit square: {p:?}");
        }
        assert!(mask_polygons(&[0; 4], 2, 2, 0.0, 1).is_empty());
    }
}
