# ctest: the optimizer options of the command line reach the optimizers that have them, --set
# reaches one optimizer, --seeds runs each optimizer once per seed, and the JSON records every
# run with every option it ran with.
#   cmake -DBENCH=mep_bench -DDATA=data/mnist -DWORK=dir -P expect_options.cmake
file(REMOVE_RECURSE ${WORK})
execute_process(COMMAND ${BENCH} --model mlp_small --epochs 1 --train 256 --test 128 --threads 1 --data ${DATA}
                        --optimizers sgd,smep,sdmep --seeds 3,5 --beta 0.25 --momentum 0.8 --symmetric
                        --set smep.lr=0.02 --set sdmep.ns_coefficients=polar_express --spectral-mode clip
                        --set smep.bound_input_layer=false --json ${WORK}/options.json
                        --csv ${WORK}/options.csv --svg ${WORK}/options.svg
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mep_bench failed (${rc}): ${err}")
endif()
if(NOT out MATCHES "Best Test Acc \\(mean ± sd; seeds 3, 5\\)")
  message(FATAL_ERROR "the table does not show the mean over the seeds:\n${out}")
endif()
file(READ ${WORK}/options.json json)
string(JSON seeds GET "${json}" protocol seeds)
if(NOT seeds MATCHES "^\\[ *3, *5 *\\]$")
  message(FATAL_ERROR "protocol.seeds is ${seeds}")
endif()
string(JSON n LENGTH "${json}" results)
if(NOT n EQUAL 6)
  message(FATAL_ERROR "expected 6 runs (3 optimizers x 2 seeds), found ${n}")
endif()
# expect(run option value): results[run].options.option == value ("" for an absent option)
function(expect run option value)
  string(JSON got ERROR_VARIABLE missing GET "${json}" results ${run} options ${option})
  if(missing)
    set(got "")
  endif()
  if(value MATCHES "^[0-9.]+$" AND got MATCHES "^[0-9.e+-]+$")
    set(differ FALSE)
    if(NOT got EQUAL value)  # compared as doubles
      set(differ TRUE)
    endif()
  elseif(NOT got STREQUAL value)
    set(differ TRUE)
  else()
    set(differ FALSE)
  endif()
  if(differ)
    string(JSON name GET "${json}" results ${run} optimizer)
    message(FATAL_ERROR "run ${run} (${name}): option ${option} is '${got}', expected '${value}'")
  endif()
endfunction()
foreach(base 0 3)  # seed 3 runs first, then seed 5, each sgd, smep, sdmep
  math(EXPR smep "${base} + 1")
  math(EXPR sdmep "${base} + 2")
  expect(${base} lr 0.1)
  expect(${base} momentum 0.8)
  expect(${base} beta "")
  expect(${smep} lr 0.02)
  expect(${smep} beta 0.25)
  expect(${smep} symmetric ON)
  expect(${smep} momentum 0.8)
  expect(${smep} ns_coefficients cubic)  # its default: --set sdmep.… stays in sdmep
  expect(${smep} spectral_mode clip)
  expect(${smep} bound_input_layer OFF)
  expect(${sdmep} lr 0.01)
  expect(${sdmep} ns_coefficients polar_express)
  expect(${sdmep} spectral_mode clip)
  expect(${sdmep} bound_input_layer ON)
endforeach()
string(JSON seed GET "${json}" results 4 seed)
if(NOT seed EQUAL 5)
  message(FATAL_ERROR "results[4].seed is ${seed}, expected 5")
endif()
# The CSV: a header and one row per optimizer, seed and epoch.
file(STRINGS ${WORK}/options.csv rows)
list(LENGTH rows n)
list(GET rows 0 header)
list(GET rows 5 row)
if(NOT n EQUAL 7 OR NOT header MATCHES "^optimizer,seed,epoch,train_loss,train_acc,test_loss,test_acc,"
   OR NOT row MATCHES "^smep,5,1,[0-9.e-]+,")
  message(FATAL_ERROR "unexpected CSV (${n} lines):\n${header}\n${row}")
endif()

# The SVG parses as XML and holds a curve, a band (two seeds) and a bar per optimizer.
execute_process(COMMAND ${PYTHON} -c "
import sys, xml.etree.ElementTree as ET
ns = {'s': 'http://www.w3.org/2000/svg'}
root = ET.parse(sys.argv[1]).getroot()
curves = root.findall('.//s:g[@id=\"accuracy\"]/s:g', ns)
bars = root.findall('.//s:g[@id=\"speed\"]/s:rect', ns)
bands = root.findall('.//s:g[@id=\"accuracy\"]/s:g/s:polygon', ns)
labels = [t.text for t in root.findall('.//s:g[@id=\"accuracy\"]/s:g/s:title', ns)]
assert len(curves) == 3 and len(bars) == 3 and len(bands) == 3, (len(curves), len(bars), len(bands))
assert labels == ['SGD', 'SMEP', 'SDMEP'], labels
assert any('(1.0×)' in (t.text or '') for t in root.iter('{http://www.w3.org/2000/svg}text')), 'no ratio to SGD'
" ${WORK}/options.svg RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the SVG is not what was expected: ${err}")
endif()

# scripts/maintainer/seeds_table.py: one row per optimizer over both seeds; runs of one optimizer with
# other options are another row, labelled by the options that differ.
execute_process(COMMAND ${BENCH} --model mlp_small --epochs 1 --train 256 --test 128 --threads 1 --data ${DATA}
                        --optimizers smep --seeds 3,5 --json ${WORK}/defaults.json
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mep_bench (defaults) failed (${rc}): ${err}")
endif()
# A run of one seed only: its row shows that seed, and — for the other.
execute_process(COMMAND ${BENCH} --model mlp_small --epochs 1 --train 256 --test 128 --threads 1 --data ${DATA}
                        --optimizers adam --seed 5 --json ${WORK}/adam5.json
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mep_bench (adam, seed 5) failed (${rc}): ${err}")
endif()
execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/../scripts/maintainer/seeds_table.py ${WORK}/options.json
                        ${WORK}/defaults.json ${WORK}/adam5.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE table ERROR_VARIABLE err)
string(REGEX MATCHALL "\n[|] [a-z_]+[^|]*[|]" rows "${table}")
list(LENGTH rows n)
if(NOT rc EQUAL 0 OR NOT n EQUAL 5 OR NOT table MATCHES "seeds 3, 5"
   OR NOT table MATCHES "[|] adam [|] — / [0-9.]+ [|] [0-9.]+ % [|]"
   OR NOT table MATCHES "[|] smep [(][^|]*spectral_mode clip[^|]*[)] [|]"
   OR NOT table MATCHES "[|] smep [(][^|]*spectral_mode scale[^|]*[)] [|]"
   OR NOT table MATCHES "[|] sgd [|]")
  message(FATAL_ERROR "seeds_table.py (${rc}, ${n} rows): ${err}\n${table}")
endif()

# --protocol full trains and tests on every sample of the files (their counts: the label
# files' headers).
execute_process(COMMAND ${BENCH} --model mlp_small --epochs 1 --threads 1 --data ${DATA} --optimizers sgd
                        --protocol full --json ${WORK}/full.json
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mep_bench --protocol full failed (${rc}): ${err}")
endif()
file(READ ${WORK}/full.json json)
foreach(split train test)
  set(file ${DATA}/${split}-labels-idx1-ubyte)
  if(split STREQUAL test)
    set(file ${DATA}/t10k-labels-idx1-ubyte)
  endif()
  file(READ ${file} count HEX OFFSET 4 LIMIT 4)
  math(EXPR count "0x${count}")
  string(JSON got GET "${json}" protocol ${split})
  if(NOT got EQUAL count)
    message(FATAL_ERROR "--protocol full: protocol.${split} is ${got}, the file holds ${count}")
  endif()
endforeach()

# --from-json gathers saved runs: both files' runs in one table, JSON, CSV and picture, with
# smep's two configurations as two rows labelled by the options that differ, and Adam's one
# seed named as such.
execute_process(COMMAND ${BENCH} --from-json ${WORK}/options.json,${WORK}/defaults.json,${WORK}/adam5.json
                        --json ${WORK}/merged.json
                        --csv ${WORK}/merged.csv --svg ${WORK}/merged.svg
                RESULT_VARIABLE rc OUTPUT_VARIABLE table ERROR_VARIABLE err)
string(REGEX MATCHALL "\n[|] [0-9]+ [|] [A-Za-z]+[^|]*[|]" rows "${table}")
list(LENGTH rows n)
if(NOT rc EQUAL 0 OR NOT n EQUAL 5 OR NOT table MATCHES "[|] SMEP [(][^|]*spectral_mode clip[^|]*[)] [|]"
   OR NOT table MATCHES "[|] SMEP [(][^|]*spectral_mode scale[^|]*[)] [|]" OR NOT table MATCHES "[|] SGD [|]"
   OR NOT table MATCHES "seeds 3, 5" OR NOT table MATCHES "[|] Adam [|] [0-9.]+% [(]seed 5 only[)] [|]")
  message(FATAL_ERROR "--from-json (${rc}, ${n} rows): ${err}\n${table}")
endif()
file(READ ${WORK}/merged.json json)
string(JSON n LENGTH "${json}" results)
string(JSON seeds GET "${json}" protocol seeds)
string(JSON lr GET "${json}" results 1 options lr)
if(NOT n EQUAL 9 OR NOT seeds MATCHES "^\\[ *3, *5 *\\]$" OR NOT lr EQUAL 0.02)
  message(FATAL_ERROR "--from-json --json: ${n} runs (expected 9), seeds ${seeds}, results[1] lr ${lr}")
endif()
file(STRINGS ${WORK}/merged.csv rows)
list(LENGTH rows n)
list(GET rows 2 clip)
list(GET rows 7 plain)
if(NOT n EQUAL 10 OR NOT clip MATCHES "^smep,3,1,.*,\"[^\"]*spectral_mode clip[^\"]*\"$"
   OR NOT plain MATCHES "^smep,3,1,.*,\"[^\"]*spectral_mode scale[^\"]*\"$")
  message(FATAL_ERROR "--from-json --csv (${n} lines):\n${clip}\n${plain}")
endif()
execute_process(COMMAND ${PYTHON} -c "
import sys, xml.etree.ElementTree as ET
ns = {'s': 'http://www.w3.org/2000/svg'}
root = ET.parse(sys.argv[1]).getroot()
labels = [t.text for t in root.findall('.//s:g[@id=\"accuracy\"]/s:g/s:title', ns)]
bars = root.findall('.//s:g[@id=\"speed\"]/s:rect', ns)
assert len(labels) == 5 and len(bars) == 5, labels
assert labels[0] == 'SGD' and labels[2] == 'SDMEP' and labels[4] == 'Adam', labels
assert 'spectral_mode clip' in labels[1] and 'spectral_mode scale' in labels[3], labels
assert float(root.get('width')) > 980, 'the speed panel does not make room for the long labels'
" ${WORK}/merged.svg RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the --from-json SVG is not what was expected: ${err}")
endif()
# … and refuses what it cannot gather, with one line naming the problem.
function(expect_from_json_fails expect)
  execute_process(COMMAND ${BENCH} --from-json ${ARGN} RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  string(STRIP "${err}" err)
  if(rc EQUAL 0 OR NOT err MATCHES "^mep_bench: --from-json${expect}")
    message(FATAL_ERROR "--from-json ${ARGN}: expected an error matching '${expect}', got (${rc}) ${err}")
  endif()
endfunction()
expect_from_json_fails(" [^ ]*full.json: of another protocol than [^ ]*options.json: test [0-9]+ here, 128 there$"
                       ${WORK}/options.json,${WORK}/full.json)
execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/../scripts/maintainer/seeds_table.py ${WORK}/options.json
                        ${WORK}/full.json RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "full.json is of another protocol than [^ ]*options.json: train ")
  message(FATAL_ERROR "seeds_table.py gathered runs of two protocols (${rc}): ${err}")
endif()
expect_from_json_fails(": SGD, seed 3, is both in " ${WORK}/options.json,${WORK}/options.json)
file(WRITE ${WORK}/unknown.json [=[{"protocol": {"epochs": 1}, "results": [{"optimizer": "nope"}]}]=])
expect_from_json_fails(" [^ ]*unknown.json: results\\[0\\]: optimizer nope is not in this build" ${WORK}/unknown.json)
file(WRITE ${WORK}/truncated.json [=[{"protocol": {"epochs": 1}, "results": [{"optimizer": "sgd", "se]=])
expect_from_json_fails(" [^ ]*truncated.json: not JSON" ${WORK}/truncated.json --svg ${WORK}/never.svg)
if(EXISTS ${WORK}/never.svg)
  message(FATAL_ERROR "a failed --from-json left its output")
endif()
message(STATUS "options, --set, --seeds, --csv, seeds_table.py, --protocol full and --from-json reach the optimizers and the outputs")
