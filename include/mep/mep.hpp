#pragma once
/// \file mep.hpp
/// mep — Equilibrium Propagation and backprop optimizers for LibTorch. The umbrella header.

#include <mep/device.hpp>
#include <mep/listing.hpp>
#include <mep/loss.hpp>
#include <mep/models.hpp>
#include <mep/optimizer.hpp>
#include <mep/presets.hpp>
#include <mep/version.hpp>
#include <mep/data/idx.hpp>

#ifdef MEP_WITH_CUDA
#include <mep/cuda_graph.hpp>  // a CUDA build of LibTorch only
#endif
