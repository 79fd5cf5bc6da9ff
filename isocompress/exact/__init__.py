"""Lossless shrinking: removing constant directions under the proven output-relative rule, alternating
diagonalisation, and the streamed one-layer-at-a-time exact shrink."""
