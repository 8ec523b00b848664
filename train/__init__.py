"""The training program: python -m train.vit_cifar100."""
