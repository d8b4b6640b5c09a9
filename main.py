"""Train and evaluate H-Deformable-DETR (command line as upstream main.py)."""
import argparse
import math

from models.backbone import DEFAULT_PRETRAINED_BACKBONE_PATH


def get_args_parser():
    parser = argparse.ArgumentParser("Deformable DETR Detector", add_help=False)
    parser.add_argument("--lr", default=2e-4, type=float)
    parser.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    parser.add_argument("--lr_backbone", default=2e-5, type=float)
    parser.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"],
                        type=str, nargs="+")
    parser.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--lr_drop", default=40, type=int)
    parser.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+")
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument("--sgd", action="store_true")

    # variants of Deformable DETR
    parser.add_argument("--with_box_refine", default=False, action="store_true")
    parser.add_argument("--two_stage", default=False, action="store_true")

    # model
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="DETR segmentation leftover; not supported by the deformable model")

    # backbone
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="resnet18/34/50/101, swin_tiny, swin_small, swin_large or swin_large_window12")
    parser.add_argument("--dilation", action="store_true",
                        help="replace the stride of the last ResNet stage by a dilation (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"),
                        help="type of positional embedding on top of the image features")
    parser.add_argument("--position_embedding_scale", default=2 * math.pi, type=float,
                        help="position / size * scale")
    parser.add_argument("--num_feature_levels", default=4, type=int, help="number of feature levels")
    parser.add_argument("--pretrained_backbone_path", default=DEFAULT_PRETRAINED_BACKBONE_PATH, type=str,
                        help="ImageNet weights of the backbone: the official Swin file for Swin backbones; for "
                             "ResNet, a torchvision state dict (when not given, torchvision's weights are used)")
    parser.add_argument("--no_pretrained_backbone", dest="pretrained_backbone", action="store_false",
                        help="train the backbone from random initialisation instead of ImageNet weights")
    parser.add_argument("--drop_path_rate", default=0.2, type=float)

    # transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="number of encoder layers")
    parser.add_argument("--dec_layers", default=6, type=int, help="number of decoder layers")
    parser.add_argument("--dim_feedforward", default=2048, type=int,
                        help="hidden size of the feed-forward layers in the transformer blocks")
    parser.add_argument("--hidden_dim", default=256, type=int, help="size of the transformer embeddings")
    parser.add_argument("--dropout", default=0.1, type=float, help="dropout applied in the transformer")
    parser.add_argument("--nheads", default=8, type=int, help="number of attention heads")
    parser.add_argument("--num_queries_one2one", default=300, type=int,
                        help="number of queries trained with one-to-one matching (used at evaluation)")
    parser.add_argument("--num_queries_one2many", default=0, type=int,
                        help="number of extra queries trained with one-to-many matching")
    parser.add_argument("--dec_n_points", default=4, type=int)
    parser.add_argument("--enc_n_points", default=4, type=int)
    # Deformable DETR tricks
    parser.add_argument("--mixed_selection", action="store_true", default=False)
    parser.add_argument("--look_forward_twice", action="store_true", default=False)
    # hybrid branch
    parser.add_argument("--k_one2many", default=5, type=int)
    parser.add_argument("--lambda_one2many", default=1.0, type=float)

    # segmentation (DETR leftover)
    parser.add_argument("--masks", action="store_true", help="not supported by the deformable model")

    # loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary decoding losses (loss at each layer)")

    # matcher
    parser.add_argument("--set_cost_class", default=2, type=float, help="class weight in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box weight in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="GIoU weight in the matching cost")

    # loss coefficients
    parser.add_argument("--mask_loss_coef", default=1, type=float)
    parser.add_argument("--dice_loss_coef", default=1, type=float)
    parser.add_argument("--cls_loss_coef", default=2, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--focal_alpha", default=0.25, type=float)

    # dataset
    parser.add_argument("--dataset_file", default="coco")
    parser.add_argument("--coco_path", default="./data/coco", type=str)
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="classifier size; by default the largest category id of the annotation "
                             "file + 1 (91 for COCO)")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda", help="device to use for training / testing")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--num_workers", default=2, type=int)
    parser.add_argument("--cache_mode", default=False, action="store_true",
                        help="whether to cache images on memory")

    # evaluation
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--eval_in_training_set", default=False, action="store_true")
    parser.add_argument("--topk", default=100, type=int)

    # training techniques
    parser.add_argument("--use_fp16", default=False, action="store_true")
    parser.add_argument("--use_checkpoint", default=False, action="store_true")

    # logging
    parser.add_argument("--use_wandb", action="store_true", default=False)
    return parser


def main(args):
    raise NotImplementedError("training entry point: being written")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Deformable DETR training and evaluation script", parents=[get_args_parser()])
    main(parser.parse_args())
