#!/usr/bin/env bash
# Demo: a small H-Deformable-DETR (ResNet-18 from scratch, hybrid matching, two-stage, mqs, lft) trained on
# the synthetic shapes dataset (python tools/make_synthetic_coco.py --out data/synthetic) on a CPU.

set -x

EXP_DIR=exps/demo/r18_synthetic_hybrid_two_stage
PY_ARGS=("$@")

python -u main.py \
    --output_dir ${EXP_DIR} \
    --coco_path data/synthetic \
    --device cpu \
    --backbone resnet18 \
    --no_pretrained_backbone \
    --lr 5e-4 \
    --lr_backbone 5e-4 \
    --num_feature_levels 3 \
    --hidden_dim 64 \
    --nheads 4 \
    --enc_layers 2 \
    --dec_layers 2 \
    --dim_feedforward 256 \
    --dropout 0.0 \
    --with_box_refine \
    --two_stage \
    --mixed_selection \
    --look_forward_twice \
    --num_queries_one2one 30 \
    --num_queries_one2many 120 \
    --k_one2many 4 \
    --lambda_one2many 1.0 \
    --train_scales 112 128 144 \
    --val_scale 128 \
    --max_size 256 \
    --no_crop_augment \
    --batch_size 8 \
    --num_workers 0 \
    --epochs 12 \
    --lr_drop 10 \
    --print_freq 50 \
    "${PY_ARGS[@]}"
