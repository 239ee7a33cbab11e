# ctest: mep_bench --from-json on two saved runs (golden/runs.json, golden/beta.json: four
# optimizers at seeds 0 and 1, and SMEP with beta 0.3 at seed 1) prints the same header and
# Markdown table, and writes the same JSON, CSV and SVG, byte for byte, as the expected files
# golden/gathered.{stdout,json,csv,svg}. It pins the layout of every output, which the other
# bench tests check in part only; --from-json reads its timings from the files, so the outputs
# do not change from run to run.
#   cmake -DBENCH=mep_bench -DGOLDEN=bench/golden -DWORK=dir -P expect_golden.cmake
# After a deliberate change of an output: the same with -DUPDATE=ON rewrites the expected files.
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
execute_process(COMMAND ${BENCH} --from-json ${GOLDEN}/runs.json,${GOLDEN}/beta.json
                        --json gathered.json --csv gathered.csv --svg gathered.svg
                WORKING_DIRECTORY ${WORK} RESULT_VARIABLE rc OUTPUT_FILE ${WORK}/gathered.stdout ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mep_bench --from-json failed (${rc}): ${err}")
endif()
set(changed "")
foreach(ext stdout json csv svg)
  if(UPDATE)
    configure_file(${WORK}/gathered.${ext} ${GOLDEN}/gathered.${ext} COPYONLY)
  endif()
  execute_process(COMMAND ${CMAKE_COMMAND} -E compare_files ${GOLDEN}/gathered.${ext} ${WORK}/gathered.${ext}
                  RESULT_VARIABLE differ)
  if(NOT differ EQUAL 0)
    list(APPEND changed gathered.${ext})
  endif()
endforeach()
if(changed)
  message(FATAL_ERROR "outputs differ from ${GOLDEN}: ${changed} (compare with: diff ${GOLDEN}/gathered.stdout "
                      "${WORK}/gathered.stdout, and so on)")
endif()
message(STATUS "the table, JSON, CSV and SVG of the saved runs are the expected ones")
