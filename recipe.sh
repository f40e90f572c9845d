#!/usr/bin/env bash
# recipe.sh: the PARL-MT ablation, every row, with the stages' own CLIs (nothing hidden: read the commands below).
#
#   bash recipe.sh smoke     # tiny model, every row, small sizes: what CI runs (a few minutes on 2 CPU cores)
#   bash recipe.sh cpu       # the 2-core default: tiny model from scratch, 3 seeds (about 38 minutes per seed)
#   bash recipe.sh gpu       # one GPU, SmolLM2-135M-Instruct (offline GGUF), sized for about 10 minutes on an H200
#   bash recipe.sh gpu --force   # rerun every stage (default: a stage whose output is complete is skipped)
#   RECIPE_SMALL=1 bash recipe.sh gpu   # the same commands at toy sizes, to check a preset where it cannot run (CPU)
#   RECIPE_SEEDS="0" bash recipe.sh cpu  # only these seeds of a preset (a 3-seed run in parts, or one seed)
#
# Rows: 0 the base model zero-shot (gpu only: a tiny model from scratch has no base), 1 SFT without progress
# awareness, 2 PAG-SFT, 3 MT-GRPO (RL without awareness, turn-level credit) from 1, 4 PAG-RL (full context) from 2,
# 5 PAG-RL (summary context) from 2. Each eval writes results/<preset>/<row>[-s<seed>].json (eval.py --results);
# `python eval.py --table results/<preset>` prints the table the README pastes, and the end of the run prints the
# paired comparisons PAG-SFT vs SFT and PAG-RL vs PAG-SFT (eval.py --compare). Outputs: data-<preset>*/,
# out/<preset>/, results/<preset>/. A stage that fails stops the recipe with its own error.
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-}
force=${2:-}
[[ "$preset" =~ ^(smoke|cpu|gpu)$ ]] || { echo "usage: bash recipe.sh smoke|cpu|gpu [--force]" >&2; exit 2; }
[[ -z "$force" || "$force" == "--force" ]] || { echo "unknown option $force (only --force)" >&2; exit 2; }
[ -d .venv ] && [ -z "${VIRTUAL_ENV:-}" ] && . .venv/bin/activate

D=data-$preset O=out/$preset R=results/$preset
mkdir -p "$O" "$R"
t_all=$(date +%s)
timings=()

# stage NAME DONE-MARKER COMMAND...: run COMMAND unless DONE-MARKER exists (then skip); the marker is written only
# after the command succeeded (checkpoints and results files are themselves written atomically), so an
# interrupted stage reruns. Every stage's wall time is printed at the end.
stage() {
  local name=$1 done=$2
  shift 2
  if [[ -e "$done" && "$force" != "--force" ]]; then
    echo "== $name: done before ($done), skipped"
    timings+=("$(printf '%-40s %6s' "$name" skipped)")
    return
  fi
  echo "== $name: $*"
  local t0=$(date +%s)
  "$@"
  mkdir -p "$(dirname "$done")" && touch "$done"
  timings+=("$(printf '%-40s %5ds' "$name" $(( $(date +%s) - t0 )))")
}

case $preset in
  smoke)
    seeds="0"
    GEN=(--num-episodes 240 --num-rl 40 --stats-sample 20 --stats-vocab-size 400)
    SFT=(--num-steps 30 --eval-every 0 --eval-tasks 0)
    RL=(--num-steps 2 --prompts-per-step 2 --group-size 2 --max-new-tokens 24 --eval-every 0 --sample-every 0)
    EVAL=(--limit 8 --max-new-tokens 24 --max-steps 2)
    BFCL=()
    ;;
  cpu)
    seeds="0 1 2"
    GEN=()
    SFT=()
    RL=()
    EVAL=()
    BFCL=()
    ;;
  gpu)
    seeds="0"
    GEN=(--world full)
    SFT=(--init-from smollm2 --lr 1e-4 --num-steps 150 --batch-tokens 16384 --device-batch-size 4 --eval-every 0 --eval-tasks 0)
    RL=(--lr 1e-6 --num-steps 8 --prompts-per-step 16 --group-size 8 --device-batch-size 16 --max-len 3072 --eval-every 0
        --save-every 4 --time-limit 60)
    EVAL=(--batch-size 64 --max-new-tokens 160 --max-steps 6)
    BFCL=(--bench bfcl --limit 5 --batch-size 20 --max-new-tokens 160 --max-steps 6)
    ;;
esac

seeds=${RECIPE_SEEDS:-$seeds}
if [[ -n "${RECIPE_SMALL:-}" ]]; then  # the same commands at toy sizes (argparse: the last flag wins), to check a preset
  GEN+=(--num-episodes 100 --num-rl 10 --stats-sample 10 --stats-vocab-size 300)
  SFT+=(--num-steps 1 --batch-tokens 4096 --device-batch-size 1)
  RL+=(--num-steps 1 --prompts-per-step 2 --group-size 2 --max-new-tokens 16 --device-batch-size 4)
  EVAL+=(--limit 2 --max-new-tokens 16 --max-steps 1 --batch-size 2)
  (( ${#BFCL[@]} )) && BFCL+=(--limit 1 --max-new-tokens 16 --max-steps 1 --batch-size 4)
  D=$D-small O=$O-small R=$R-small
  mkdir -p "$O" "$R"
fi

stage "data, with awareness" "$D/.done" python gen_data.py "${GEN[@]}" --out-dir "$D"
stage "data, without awareness" "$D-nopa/.done" python gen_data.py "${GEN[@]}" --pa none --out-dir "$D-nopa"

evals() {  # evals ROW-FILE CKPT DATA-DIR EVAL-FLAGS...: val (the training distribution) and test (held-out function
  # combinations and the longer horizon), each on its own, and BFCL (both prompts) on the GPU
  local res=$1 ckpt=$2 data=$3 row
  row=$(basename "$res" .json)
  shift 3
  for split in val test; do
    stage "eval $row $split" "$O/.done/$row.synthetic-$split" python eval.py --ckpt "$ckpt" "${EVAL[@]}" \
      --data "$data/$split.jsonl" "$@" --results "$res" --out-file "$O/eval/$row-$split.json"
  done
  if (( ${#BFCL[@]} )); then
    stage "bfcl (ours) $row" "$O/.done/$row.bfcl-ours" python eval.py --ckpt "$ckpt" "${BFCL[@]}" \
      --bfcl-prompt ours "$@" --results "$res" --out-file "$O/eval/$row-bfcl-ours.json"
    stage "bfcl (official) $row" "$O/.done/$row.bfcl-official" python eval.py --ckpt "$ckpt" "${BFCL[@]}" \
      --bfcl-prompt official --max-len 8192 --results "$res" --out-file "$O/eval/$row-bfcl-official.json"
  fi
}

if [[ $preset == gpu ]]; then
  evals "$R/0-base.json" smollm2 "$D" --row "0 SmolLM2-135M-Instruct zero-shot"
fi
for s in $seeds; do
  sfx=$([[ $preset == cpu ]] && echo "-s$s" || true)
  stage "1 SFT, no awareness, seed $s" "$O/s$s/sft_nopa/.done" python sft.py "${SFT[@]}" --seed "$s" \
    --train "$D-nopa/train.jsonl" --val "$D-nopa/val.jsonl" --out-dir "$O/s$s/sft_nopa"
  evals "$R/1-sft-nopa$sfx.json" "$O/s$s/sft_nopa" "$D-nopa" --pa off --row "1 SFT without awareness"
  stage "2 PAG-SFT, seed $s" "$O/s$s/sft/.done" python sft.py "${SFT[@]}" --seed "$s" \
    --train "$D/train.jsonl" --val "$D/val.jsonl" --out-dir "$O/s$s/sft"
  evals "$R/2-pag-sft$sfx.json" "$O/s$s/sft" "$D" --row "2 PAG-SFT"
  stage "3 MT-GRPO from 1, seed $s" "$O/s$s/rl_nopa/.done" python rl.py "${RL[@]}" --seed "$s" --adv mt_grpo --pa off \
    --init-from "$O/s$s/sft_nopa" --tasks "$D-nopa/rl.jsonl" --eval-tasks "$D-nopa/val.jsonl" --out-dir "$O/s$s/rl_nopa"
  evals "$R/3-mt-grpo$sfx.json" "$O/s$s/rl_nopa" "$D-nopa" --pa off --row "3 MT-GRPO (no awareness), from 1"
  stage "4 PAG-RL full, seed $s" "$O/s$s/rl/.done" python rl.py "${RL[@]}" --seed "$s" \
    --init-from "$O/s$s/sft" --tasks "$D/rl.jsonl" --eval-tasks "$D/val.jsonl" --out-dir "$O/s$s/rl"
  evals "$R/4-pag-rl$sfx.json" "$O/s$s/rl" "$D" --row "4 PAG-RL, full context, from 2"
  stage "5 PAG-RL summary, seed $s" "$O/s$s/rl_summary/.done" python rl.py "${RL[@]}" --seed "$s" --context-mode summary \
    --init-from "$O/s$s/sft" --tasks "$D/rl.jsonl" --eval-tasks "$D/val.jsonl" --out-dir "$O/s$s/rl_summary"
  evals "$R/5-pag-rl-summary$sfx.json" "$O/s$s/rl_summary" "$D" --context-mode summary \
    --row "5 PAG-RL, summary context, from 2"
done

echo
python eval.py --table "$R"
for s in $seeds; do
  sfx=$([[ $preset == cpu ]] && echo "-s$s" || true)
  echo "-- seed $s, PAG-SFT (A) vs SFT without awareness (B), paired by episode:"
  python eval.py --compare "$R/2-pag-sft$sfx.json" "$R/1-sft-nopa$sfx.json" | sed -n '/paired over/p'
  echo "-- seed $s, PAG-RL (A) vs PAG-SFT (B):"
  python eval.py --compare "$R/4-pag-rl$sfx.json" "$R/2-pag-sft$sfx.json" | sed -n '/paired over/p'
done
echo
echo "where the time went:"
printf '  %s\n' "${timings[@]}"
echo "  total $(( $(date +%s) - t_all ))s"
