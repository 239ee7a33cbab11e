#pragma once
/// \file version.hpp
/// mep's version (semantic; before 1.0 a minor version may change defaults: CHANGELOG.md).
/// CMake reads the project's version from these lines.

#define MEP_VERSION_MAJOR 0
#define MEP_VERSION_MINOR 4
#define MEP_VERSION_PATCH 0
#define MEP_VERSION "0.4.0"
