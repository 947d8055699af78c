# The harness's Hydra configs, shipped as package data and found as pkg://kvtriton.harness/conf (Hydra's
# package config source needs this file to see the folder as a package).
