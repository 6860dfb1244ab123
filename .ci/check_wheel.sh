#!/usr/bin/env bash
# CI: traincraft installs like a real library. Builds the sdist and the wheel (`python -m build`, the wheel from the
# sdist, so the sdist must hold everything too), installs the wheel (not editable) into a fresh virtual environment,
# and runs the README's quick starts from an empty directory, where no checkout file can be picked up by accident.
# Needs `make install` (.venv with the `build` package of the `dev` extra). About 2-4 minutes, mostly pip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="$ROOT/.venv/bin/python"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/traincraft-wheel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
START=$SECONDS
step() { printf '[check_wheel %3ds] %s\n' "$((SECONDS - START))" "$*"; }
fail() { printf '[check_wheel] FAILED: %s\n' "$*" >&2; exit 1; }

"$PY" -c "import build" 2>/dev/null || fail "the 'build' package is missing from .venv: run \`make install\` (it is in the dev extra)"

# Build from a copy of the files git would commit (tracked and untracked-not-ignored), so that neither stale
# build/ or *.egg-info directories of the checkout leak into the wheel nor the build writes into the checkout.
step "copying the source tree"
mkdir -p "$TMP/src" "$TMP/dist"
git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$TMP/src"

step "python -m build (sdist, then the wheel from the sdist)"
"$PY" -m build --outdir "$TMP/dist" "$TMP/src" >"$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; fail "python -m build"; }
SDIST=$(ls "$TMP"/dist/traincraft-*.tar.gz)
WHEEL=$(ls "$TMP"/dist/traincraft-*.whl)
step "built $(basename "$SDIST") and $(basename "$WHEEL")"

# Every file the package holds in the source (modules, py.typed, recipes, any data) must be in the wheel, and in
# the sdist; the recipes are checked by name when the source ships any.
RECIPES=$(cd "$ROOT/src" && ls traincraft/recipes/*.yaml 2>/dev/null || true)
"$PY" - "$ROOT/src" "$WHEEL" "$SDIST" <<'EOF' || fail "the file lists above"
import pathlib, sys, tarfile, zipfile
src, wheel, sdist = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wanted = {p.relative_to(src).as_posix() for p in (src / "traincraft").rglob("*")
          if p.is_file() and "__pycache__" not in p.parts}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
with tarfile.open(sdist) as tar:
    root = tar.getnames()[0].split("/")[0]
    in_sdist = {n[len(root) + len("/src/"):] for n in tar.getnames() if n.startswith(f"{root}/src/traincraft/")}
bad = False
for where, have in (("wheel", in_wheel), ("sdist", in_sdist)):
    missing = sorted(wanted - have)
    if missing:
        bad = True
        print(f"the {where} lacks {len(missing)} package file(s) of src/: {', '.join(missing[:20])}"
              " -- add them to [tool.setuptools.package-data] in pyproject.toml", file=sys.stderr)
data = sorted(n for n in wanted if not n.endswith(".py"))
if not bad:
    print(f"  wheel: {len(in_wheel)} files; all {len(wanted)} files of src/traincraft are in the wheel and the sdist;"
          f" data files: {', '.join(data)}")
for required in ("traincraft/py.typed",):
    if required not in in_wheel:
        bad = True
        print(f"the wheel lacks {required}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

step "fresh virtual environment; torch from constraints.txt first (an unpinned torch pulls the CUDA build)"
python3 -m venv "$TMP/venv" 2>/dev/null || "$PY" -m venv --without-pip "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip --version >/dev/null 2>&1 || "$PY" -m pip --python "$VPY" install --quiet pip
pip_install() {
    "$VPY" -m pip install --quiet -c "$ROOT/constraints.txt" "$@" >"$TMP/pip.log" 2>&1 \
        || { grep -v "is neither a file nor a directory" "$TMP/pip.log" | tail -30; fail "pip install $*"; }
}
pip_install torch==2.13.0
step "pip install the wheel (not editable) under constraints.txt"
pip_install "$WHEEL"
echo "  $("$VPY" -m pip list 2>/dev/null | grep -E '^(torch|lightning|torchmetrics|kornia|jsonargparse|wandb|traincraft) ' | tr -s ' ' | paste -sd, -)"

# From an empty directory outside the checkout: only the installed wheel can be imported.
RUN="$TMP/empty"
mkdir "$RUN"
cd "$RUN"
export WANDB_MODE=offline WANDB_SILENT=true PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH

step "quick start: Python (README's, with default_root_dir=\"runs\"; one epoch of 3 batches) from $RUN"
"$VPY" - "$TMP/venv" 2>"$TMP/quickstart.log" <<'EOF' || { tail -40 "$TMP/quickstart.log"; fail "the Python quick start"; }
import functools, math, pathlib, sys
import lightning.pytorch as pl
import torch
import traincraft
from traincraft.callbacks import GradientClipping, LearningRateMonitor
from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

venv = pathlib.Path(sys.argv[1]).resolve()
location = pathlib.Path(traincraft.__file__).resolve()
assert venv in location.parents, f"traincraft was imported from {location}, not from the wheel installed in {venv}"
data = DigitsDataModule(image_size=32, batch_size=64)
model = ImageClassifier(
    "alexnet", num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.image_size,
    model_kwargs={"width": 0.25},
    optimizer=functools.partial(torch.optim.SGD, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4),
    lr_multipliers={"features.conv1.*": 2.0},
)
callbacks = [GradientClipping(mode="norm", threshold=1.0), LearningRateMonitor(log_update_ratio=True)]
# The README's Trainer (max_epochs=10, default_root_dir="runs": where the CLI writes), shortened.
trainer = pl.Trainer(max_epochs=1, callbacks=callbacks, default_root_dir="runs",
                     limit_train_batches=3, limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model, datamodule=data)
assert trainer.global_step == 3, f"expected 3 optimizer steps, got {trainer.global_step}"
here = pathlib.Path.cwd()
written = sorted(p.relative_to(here).as_posix() for p in here.rglob("*.ckpt"))
assert written and all(p.startswith("runs/") for p in written), f"the checkpoints are not all under runs/: {written}"
assert not (here / "lightning_logs").exists(), "the Python quick start wrote lightning_logs/ outside runs/"
logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
losses = [v for k, v in logged.items() if "loss" in k]
assert losses and all(math.isfinite(v) for v in losses), f"no finite loss among the logged metrics {logged}"
print(f"  imported from {location.parent}; 3 steps; wrote {', '.join(written)}; logged {', '.join(f'{k}={v:.4g}' for k, v in sorted(logged.items()))}")
EOF

TC="$TMP/venv/bin/traincraft"
[ -x "$TC" ] || fail "the wheel installed no 'traincraft' console script"
SHORT=(--trainer.max_epochs 1 --trainer.limit_train_batches 3 --trainer.limit_val_batches 2
       --trainer.enable_progress_bar false)

step "quick start: traincraft fit (the default recipe), W&B offline, beside the Python quick start's runs/"
"$TC" fit "${SHORT[@]}" >"$TMP/fit_default.log" 2>&1 || { tail -40 "$TMP/fit_default.log"; fail "traincraft fit"; }
[ -f runs/checkpoints/last.ckpt ] || fail "traincraft fit wrote no runs/checkpoints/last.ckpt (found: $(find runs -type f | head))"
ls -d runs/wandb/offline-run-* >/dev/null 2>&1 || fail "traincraft fit left no W&B offline run under runs/wandb/"
echo "  wrote runs/checkpoints/last.ckpt and $(ls -d runs/wandb/offline-run-* | head -1)"

step "traincraft test --ckpt_path runs/checkpoints/last.ckpt"
"$TC" test --ckpt_path runs/checkpoints/last.ckpt --trainer.limit_test_batches 2 \
    --trainer.enable_progress_bar false >"$TMP/test.log" 2>&1 || { tail -40 "$TMP/test.log"; fail "traincraft test"; }
grep -q "test/acc" "$TMP/test.log" && grep -q "test/loss" "$TMP/test.log" \
    || { tail -20 "$TMP/test.log"; fail "traincraft test printed no test/acc and test/loss"; }
echo "  $(grep -E 'test/(acc|loss) ' "$TMP/test.log" | tr -s ' │' ' ' | paste -sd, -)"

if [ -n "$RECIPES" ]; then
    NAMES=$(for r in $RECIPES; do basename "$r" .yaml; done | tr '\n' ' ')
    step "shipped recipes in the source: $NAMES; each must be in the wheel and runnable by name"
    MISSING=$("$PY" -c "import sys, zipfile; print(*sorted(set(sys.argv[2:]) - set(zipfile.ZipFile(sys.argv[1]).namelist())))" \
        "$WHEEL" $RECIPES)
    [ -z "$MISSING" ] || fail "the wheel lacks the recipes $MISSING"
    "$TC" recipes >"$TMP/recipes.log" 2>&1 || { cat "$TMP/recipes.log"; fail "traincraft recipes"; }
    for n in $NAMES; do grep -q "$n" "$TMP/recipes.log" || fail "traincraft recipes does not list $n"; done
    sed 's/^/  /' "$TMP/recipes.log"
    step "quick start: traincraft fit --config digits_alexnet_small (a recipe by name, no file here), in a fresh runs/"
    rm -rf runs
    "$TC" fit --config digits_alexnet_small "${SHORT[@]}" >"$TMP/fit_recipe.log" 2>&1 \
        || { tail -40 "$TMP/fit_recipe.log"; fail "traincraft fit --config digits_alexnet_small"; }
    [ -f runs/checkpoints/last.ckpt ] || fail "the recipe's fit wrote no runs/checkpoints/last.ckpt"
    step "traincraft test --config digits_alexnet_small --ckpt_path runs/checkpoints/last.ckpt"
    "$TC" test --config digits_alexnet_small --ckpt_path runs/checkpoints/last.ckpt --trainer.limit_test_batches 2 \
        --trainer.enable_progress_bar false >"$TMP/test_recipe.log" 2>&1 \
        || { tail -40 "$TMP/test_recipe.log"; fail "traincraft test --config digits_alexnet_small"; }
    grep -q "test/acc" "$TMP/test_recipe.log" || { tail -20 "$TMP/test_recipe.log"; fail "the recipe's test printed no test/acc"; }
    echo "  $(grep -E 'test/(acc|loss) ' "$TMP/test_recipe.log" | tr -s ' │' ' ' | paste -sd, -)"
    RECIPE_CHECK="recipes, fit and test --config digits_alexnet_small"
else
    step "no recipes in src/traincraft/recipes yet: traincraft fit --help instead of a recipe by name"
    "$TC" fit --help >"$TMP/help.log" 2>&1 || { tail -20 "$TMP/help.log"; fail "traincraft fit --help"; }
    grep -q -- "--config" "$TMP/help.log" || fail "traincraft fit --help does not mention --config"
    RECIPE_CHECK="fit --help (no shipped recipes)"
fi

step "PASSED: sdist + wheel built; wheel holds every package file incl. py.typed${RECIPES:+ and the recipes};" \
     "installed into a fresh venv; Python quick start (into runs/), traincraft fit, traincraft test," \
     "traincraft $RECIPE_CHECK" \
     "ran from an empty directory"
