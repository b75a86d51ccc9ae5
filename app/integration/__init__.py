"""Hospital integration (issue 18): the DICOM network, DICOMweb and HL7 FHIR.

Qt-free, like the rest of the core: the CLI and the GUI reach it through the facade
(``Client.pacs``, app/integration/facade.py). Real PACS servers (Orthanc) and DICOM tools
(dcmtk) are only ever run as separate processes by the tests; nothing GPL is imported.
"""
