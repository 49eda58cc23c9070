#!/bin/bash
# Pilot for the moving HarmoDT-F arm: the study's schedule scaled 1/5 (2000 steps, t_m 100: the same 19 updates at the same
# fractions of training, so alpha_t of Eq. 12 is the same per update), seed 100 (not a study seed); mask movement at the end.
cd /work/harmodt-abl
export PYTHONPATH=/work/harmodt-abl
for eta in "$@"; do
  out=/work/studies/check/pilot-eta$eta-tm${TM:-100}; rm -rf $out
  python -m harmodt.train --tasks MT10 --data /work/studies/mt10-10/out/data --out $out --eval-episodes 0 --no-progress --threads 1 \
    --steps 2000 --warmup-steps 200 --lr 3e-4 --n-layer 3 --n-embd 128 --n-head 4 --update-every ${TM:-100} --eval-every 0 \
    --checkpoint-every 500 --log-every 100 --method harmodt-f --seed 100 --preset official --eta-max $eta > $out.log 2>&1
  python -c "
import json; m=json.load(open('$out/results.json'))['mask_movement']
print('eta_max $eta', 'bound', m['flips_bound'], 'bound frac', round(min(m['flips_bound_fraction'].values()),4), 'changed mean', round(m['changed_fraction_mean'],4), 'min', round(m['changed_fraction_min'],4), 'max', round(m['changed_fraction_max'],4))"
done
