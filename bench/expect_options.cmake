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

# scripts/seeds_table.py: one row per optimizer over both seeds; runs of one optimizer with
# other options are another row, labelled by the options that differ.
execute_process(COMMAND ${BENCH} --model mlp_small --epochs 1 --train 256 --test 128 --threads 1 --data ${DATA}
                        --optimizers smep --seeds 3,5 --json ${WORK}/defaults.json
                RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "mep_bench (defaults) failed (${rc}): ${err}")
endif()
execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/../scripts/seeds_table.py ${WORK}/options.json
                        ${WORK}/defaults.json
                RESULT_VARIABLE rc OUTPUT_VARIABLE table ERROR_VARIABLE err)
string(REGEX MATCHALL "\n[|] [a-z_]+[^|]*[|]" rows "${table}")
list(LENGTH rows n)
if(NOT rc EQUAL 0 OR NOT n EQUAL 4 OR NOT table MATCHES "seeds 3, 5"
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
message(STATUS "options, --set, --seeds, --csv, seeds_table.py and --protocol full reach the optimizers and the outputs")
