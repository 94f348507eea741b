"""Weight shapes of ResNet-50 (torchvision layout): every Conv2d and the final Linear, 25.5M values."""


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    shapes = [(64, 3, 7, 7)]
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            if b == 0:
                shapes.append((planes * 4, inplanes, 1, 1))  # downsample
            inplanes = planes * 4
    shapes.append((1000, 2048))
    return shapes
