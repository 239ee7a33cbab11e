# Install test (ctest: install.consumer). Installs the mep build tree into a temporary
# prefix, then configures, builds and runs the outside project in this directory against
# that prefix. Fails, with the output of the failing step, on any error.
#
#   cmake -DMEP_BUILD_DIR=<mep build> -DMEP_SOURCE_DIR=<mep source> -DWORK_DIR=<scratch> -P run.cmake
cmake_minimum_required(VERSION 3.18)

foreach(var MEP_BUILD_DIR MEP_SOURCE_DIR WORK_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run.cmake: -D${var}=... is required")
  endif()
endforeach()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${prefix}" "${build}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# Reuse the generator, compiler, build type and LibTorch location of the mep build.
file(STRINGS "${MEP_BUILD_DIR}/CMakeCache.txt" cache
     REGEX "^(CMAKE_GENERATOR|CMAKE_CXX_COMPILER|CMAKE_BUILD_TYPE|Torch_DIR):[A-Z]+=")
set(configure_args "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON)
set(config Release)
foreach(line IN LISTS cache)
  string(REGEX MATCH "^([^:]+):[A-Z]+=(.*)$" _ "${line}")
  set(key "${CMAKE_MATCH_1}")
  set(value "${CMAKE_MATCH_2}")
  if(value STREQUAL "")
    continue()
  elseif(key STREQUAL "CMAKE_GENERATOR")
    list(APPEND configure_args -G "${value}")
  elseif(key STREQUAL "CMAKE_BUILD_TYPE")
    set(config "${value}")
  else()
    list(APPEND configure_args "-D${key}=${value}")
  endif()
endforeach()
list(APPEND configure_args "-DCMAKE_BUILD_TYPE=${config}")

# run(<step> <command>...): runs the command, stops with its output when it fails.
function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install.consumer: ${step} failed (${rc}):\n${out}")
  endif()
  set(output "${out}" PARENT_SCOPE)
endfunction()

run(install ${CMAKE_COMMAND} --install "${MEP_BUILD_DIR}" --prefix "${prefix}" --config "${config}")
run(configure ${CMAKE_COMMAND} -S "${MEP_SOURCE_DIR}/tests/consumer" -B "${build}" ${configure_args})

# The package must come from the temporary prefix, not from elsewhere on the system.
file(STRINGS "${build}/CMakeCache.txt" mep_dir REGEX "^mep_DIR:")
string(FIND "${mep_dir}" "=${prefix}/" at)
if(at EQUAL -1)
  message(FATAL_ERROR "install.consumer: mep was not found in ${prefix} (${mep_dir})")
endif()

run(build ${CMAKE_COMMAND} --build "${build}" --config "${config}")
find_program(consumer mep_consumer PATHS "${build}" "${build}/${config}" NO_DEFAULT_PATH)
if(NOT consumer)
  message(FATAL_ERROR "install.consumer: the build produced no mep_consumer executable in ${build}")
endif()
run(run "${consumer}")
message("${output}")
