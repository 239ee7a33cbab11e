# ctest: a 2-epoch run saved with --checkpoint and resumed with --epochs 4 --resume writes the
# same JSON as an uninterrupted 4-epoch run (timings aside), and a checkpoint of another run
# is refused with one line naming what differs.
#   cmake -DBENCH=mep_bench -DDATA=data/mnist -DWORK=dir -P expect_resume.cmake
set(args --model mlp_small --train 256 --test 128 --optimizers sgd,adam,smep,sdmep,natural_ep --threads 1
    --data ${DATA})
file(REMOVE_RECURSE ${WORK})
function(run)
  execute_process(COMMAND ${BENCH} ${args} ${ARGN} RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "mep_bench ${ARGN} failed (${rc}): ${err}")
  endif()
endfunction()
run(--epochs 2 --checkpoint ${WORK}/ck)
run(--epochs 4 --checkpoint ${WORK}/ck --resume --json ${WORK}/resumed.json)
run(--epochs 4 --json ${WORK}/straight.json)
foreach(name resumed straight)
  file(READ ${WORK}/${name}.json text)
  string(REGEX REPLACE "\"(epoch_s|step_ms)\": [-0-9.e+]+" "" text "${text}")
  set(${name} "${text}")
endforeach()
if(NOT resumed STREQUAL straight)
  message(FATAL_ERROR "the resumed run's JSON differs from the uninterrupted run's")
endif()
execute_process(COMMAND ${BENCH} --model mlp --train 256 --test 128 --optimizers sgd,adam,smep,sdmep,natural_ep
                        --threads 1 --data ${DATA} --epochs 4 --checkpoint ${WORK}/ck --resume
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "^mep_bench: --resume: .*another run: model")
  message(FATAL_ERROR "a checkpoint of another model was not refused with one line: ${rc} ${err}")
endif()
message(STATUS "resumed run equals the uninterrupted one; another model's checkpoint refused")
