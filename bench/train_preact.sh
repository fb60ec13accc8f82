#!/usr/bin/env bash
# preact-resnet18 training throughput on CIFAR-shaped random data, deadbolt
# vs PyTorch, side by side (bench/train.sh --arch preact-resnet18).
#   bench/train_preact.sh [--threads N] [--repeats R] [--images N] [--epochs E] [--device cpu|cuda] ...
exec "$(dirname "$0")/train.sh" --arch preact-resnet18 "$@"
