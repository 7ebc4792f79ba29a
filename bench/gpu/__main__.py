from bench.gpu.report import main

main()
