# Axial slices (Hou et al. 2023): each disc's three central slices from the study's own axial series (ingest's second
# series), assigned to discs by the sagittal localisation; the slices resliced from the sagittal volume where there is
# none. Rows aligned with extract's disc rows. A volumes cohort has no second series: every disc keeps its resliced
# slices. The disc's label map (read from the paths the manifest names) is cut on exactly those slices' pixels: the
# masks of the simclr model's Grad-CAM attention score (stages/axial_masks.py).


rule axial_slices:
    input:
        unpack(axial_slices_inputs),
        code=code("axial_slices"),
        index=rules.extract.output.index,
        axial=rules.extract.output.axial,
        structures=rules.localise.output.structures,
        manifest=rules.ingest.output.manifest,
    output:
        slices=out("axial", "slices.npy"),
        masks=out("axial", "masks.npy"),
        second_sample=out("axial", "second_sample.npy"),
        index=out("axial", "index.parquet"),
        index_csv=out("axial", "index.csv"),
        assignment=out("axial", "assignment.parquet"),
        assignment_csv=out("axial", "assignment.csv"),
    log:
        logs("axial", "axial_slices"),
    benchmark:
        bench("axial", "axial_slices")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        second=axial_second_flags,
        options=axial_options(),
    shell:
        "python -m stages.axial_slices --index {input.index} --axial {input.axial} "
        "--structures {input.structures} {params.second} --manifest {input.manifest} {params.options} "
        "--out-slices {output.slices} --out-masks {output.masks} --out-second-sample {output.second_sample} "
        "--out-index {output.index} "
        "--out-assignment {output.assignment} > {log} 2>&1"
