"""Optimisation pieces shared by the LightningModule: parameter groups and the LR schedule."""
